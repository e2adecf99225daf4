"""The paths a new user walks (issue 27): threads on a busy machine, a failed start leaves nothing behind, resume from
an older checkpoint is a fork (never a silent overwrite), one-line errors for the small mistakes."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from engine_tiny import write_dataset

from atesd.engine import checkpoint, threads
from atesd.engine.train import main as train_main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        train_main(args)
    return e.value.code, capsys.readouterr().err.strip()


def test_threads_follow_the_free_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.choose_threads(None, n_cores=2, load=0.1) == (2, "2 cores, busy 0.1")
    assert threads.choose_threads(None, n_cores=2, load=1.6)[0] == 1  # one core free
    assert threads.choose_threads(None, n_cores=8, load=30.0)[0] == 1  # never 0
    assert threads.choose_threads(3, n_cores=2, load=9.0) == (3, "--threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.choose_threads(None, n_cores=16, load=0.0) == (1, "OMP_NUM_THREADS")


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc/stat (Linux)")
def test_busy_cores_sees_a_load_that_just_started():
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # running; the 1-minute load average would still say idle
        busy = threads.busy_cores(window=0.5)
    finally:
        hog.kill()
        hog.wait()
    assert busy is not None and busy >= 0.6, busy  # one spinning process keeps about one core busy


def test_threads_follow_a_load_that_arrives_or_leaves(monkeypatch):
    follower = threads.LoadFollower(interval=5.0)
    follower.cpus = {0, 1}
    samples = iter([(0.0, 0.0, 0.0), (6.0, 12.0, 11.0), (12.0, 24.0, 17.0), (18.0, 36.0, 23.0), (24.0, 48.0, 35.0),
                    (30.0, 60.0, 47.0)])
    monkeypatch.setattr(follower, "_sample", lambda: next(samples))
    follower.last = follower._sample()
    torch.set_num_threads(2)
    # 0-6 s: the machine busy 2 cores, this process 11/6 of them: others ~0.2, two threads stay
    assert follower() is None and torch.get_num_threads() == 2
    # 6-12 s and 12-18 s: this process gets 1 core of the 2 busy ones: others 1.0; the second sample agrees
    assert follower() is None and torch.get_num_threads() == 2  # one sample is not a trend
    line = follower()
    assert torch.get_num_threads() == 1 and line.startswith("CPU threads 2 -> 1") and "1.0 of 2 cores" in line
    # the load leaves: others 0 twice, back to two threads
    assert follower() is None and follower().startswith("CPU threads 1 -> 2") and torch.get_num_threads() == 2
    assert [threads.LoadFollower.want(follower, x) for x in (0.0, 0.6, 1.4, 5.0)] == [2, 1, 1, 1]


def test_only_the_commands_own_choice_follows_the_load(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = threads._follower
    with threads.configured(None, follow=True):
        assert threads._follower is not None
    assert threads._follower is before  # the caller's state is its own again
    with threads.configured(None):
        assert threads._follower is None and threads.follow_load() is None  # engine.evaluate: no steps to follow
    with threads.configured(1, follow=True):
        assert threads._follower is None  # --threads fixes the count
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with threads.configured(None, follow=True):
        assert threads._follower is None


def _args(model_dir, data, out, *extra):
    return ["--model", model_dir, "--data", data, "--output-dir", str(out), "--batch-size", "2", "--max-new-tokens",
            "4", "--probe-every", "0", "--no-progress", "--exposure", "fixed:0.5", *extra]


@pytest.mark.parametrize("case", ["no_valid_row", "no_such_model", "empty_file"])
def test_a_failed_start_leaves_no_run_directory(tiny_model_dir, tmp_path, monkeypatch, capsys, case):
    monkeypatch.chdir(tmp_path)  # the default run directory is runs/<model>-<time> here
    data = write_dataset(tmp_path / "d.jsonl", n=4)
    model = tiny_model_dir
    if case == "no_valid_row":
        (tmp_path / "d.jsonl").write_text(json.dumps({"problem": "x", "solution": "no boxed answer"}) + "\n")
    elif case == "empty_file":
        (tmp_path / "d.jsonl").write_text("\n")
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        model = "someorg/no-such-model"
    given = tmp_path / "given"
    given.mkdir()
    (given / "notes.txt").write_text("mine\n")
    for out in (None, given, tmp_path / "new" / "run"):
        args = _args(model, data, out or "x", "--steps", "1")
        if out is None:
            args = [a for a in args if a not in ("--output-dir", "x")]
        code, err = _cli(args, capsys)
        assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert not (tmp_path / "runs").exists() and not (tmp_path / "new").exists()
        assert sorted(os.listdir(given)) == ["notes.txt"]  # an existing --output-dir keeps only what it held
    if case == "no_such_model":
        assert "someorg/no-such-model" in err and "--model DIR" in err  # what to do


def test_resume_from_an_older_checkpoint_is_a_fork(tiny_model_dir, tmp_path, capsys):
    data = write_dataset(tmp_path / "d.jsonl", n=8)
    run = tmp_path / "run"
    train_main(_args(tiny_model_dir, data, run, "--steps", "4", "--save-every", "2"))
    capsys.readouterr()
    metrics = (run / "metrics.jsonl").read_text()
    older = run / "checkpoints" / "step-000002"
    code, err = _cli(["--resume", str(older)], capsys)
    assert code == 2 and "step-000004" in err and "--force" in err and len(err.splitlines()) == 1
    assert (run / "metrics.jsonl").read_text() == metrics  # nothing touched
    assert [os.path.basename(c) for c in checkpoint.checkpoints(str(run))] == ["step-000002", "step-000004"]
    train_main(["--resume", str(older), "--force"])
    err = capsys.readouterr().err
    assert f"resuming {run} from step 2" in err and "superseded-" in err
    aside = [d for d in os.listdir(run) if d.startswith("superseded-")]
    assert len(aside) == 1
    kept = run / aside[0]
    assert os.listdir(kept / "checkpoints") == ["step-000004"] and (kept / "metrics.jsonl").read_text() == metrics
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the fork continued from step 2


def test_small_mistakes_are_one_line(tiny_model_dir, tmp_path, capsys):
    data = write_dataset(tmp_path / "d.jsonl", n=4)
    code, err = _cli(_args(tiny_model_dir, data, "/proc/atesd-run", "--steps", "1"), capsys)
    assert code == 2 and "--output-dir" in err and len(err.splitlines()) == 1
    dup = tmp_path / "dup.yaml"
    dup.write_text("lr: 1e-3\nlr: 2e-3\n")
    code, err = _cli(["--config", str(dup)], capsys)
    assert code == 2 and "'lr' is given twice" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: two\n")
    code, err = _cli(["--config", str(bad), "--steps", "3"], capsys)  # a value a flag overrides is still checked
    assert code == 2 and "steps" in err and "two" in err


def test_stop_after_says_how_to_continue(tiny_model_dir, tmp_path, capsys):
    data = write_dataset(tmp_path / "d.jsonl", n=4)
    run = tmp_path / "run"
    torch.set_num_threads(1)
    train_main(_args(tiny_model_dir, data, run, "--steps", "3", "--stop-after", "1", "--threads", "2"))
    assert torch.get_num_threads() == 1  # the command's choice ends with it: in-process callers keep theirs
    out = capsys.readouterr().out
    assert "stopped before the last step" in out and f"--resume {run}" in out
    assert "CPU threads: 2 (--threads)" in (run / "run.log").read_text()  # the choice and its reason
