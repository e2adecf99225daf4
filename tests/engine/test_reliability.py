"""Reliability of runs (issue 18): --resume restores the run's own config; nothing is written outside the run
directory; a kill during a metrics write and a damaged newest checkpoint are survived; bad data lines are skipped
and counted; failures are recorded in run.log; Ctrl-C checkpoints; checkpoints are portable; --report-to wandb."""

import importlib.machinery
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest
from engine_tiny import write_dataset

import atesd.engine.evaluate as evaluate_mod
import atesd.engine.evaluation as evaluation_mod
import atesd.engine.train as train_mod
import atesd.engine.trainer as trainer_mod
from atesd.engine import checkpoint
from atesd.engine.data import read_records
from atesd.engine.errors import DataError, UsageError
from atesd.engine.invocation import parse, parse_invocation
from atesd.engine.train import train
from atesd.engine.trainer import TIMING_METRICS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMING = TIMING_METRICS


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "train.jsonl", n=24)


def _args(model_dir, data, out, *extra):
    return [
        "--model", model_dir, "--data", data, "--output-dir", str(out), "--exposure", "adaptive", "--steps", "6",
        "--batch-size", "2", "--micro-batch", "1", "--max-new-tokens", "8", "--lr", "2e-3", "--seed", "3",
        "--save-every", "2", "--probe-every", "3", "--probe-size", "2", "--no-progress", *extra,
    ]  # fmt: skip


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in fh]


def _log(run_dir):
    with open(os.path.join(run_dir, "run.log")) as fh:
        return fh.read()


def _tree(path):
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


def _env():
    return {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def reference(tiny_model_dir, data, tmp_path_factory):
    """One uninterrupted 6-step run; every interrupted-and-resumed run must reproduce its metrics exactly."""
    run = train(*parse(_args(tiny_model_dir, data, tmp_path_factory.mktemp("ref") / "run")))
    return _metrics(run)


# ---------------------------------------------------------------------------------------------- item 1
def test_resume_restores_the_runs_config(tiny_model_dir, data, tmp_path, reference):
    run = tmp_path / "run"
    train(*parse(_args(tiny_model_dir, data, run, "--stop-after", "3")))
    stored = (run / "config.yaml").read_text()
    assert "stop_after" not in stored and "progress" not in stored  # per-invocation settings are not the run's
    # bare --resume DIR: the run's seed, steps, lr, exposure... (not the defaults: seed 0, 80 steps, lr 1e-3)
    inv = parse_invocation(["--resume", str(run), "--no-progress"])
    cfg = inv.config
    assert (cfg.seed, cfg.steps, cfg.lr, cfg.exposure, cfg.batch_size) == (3, 6, 2e-3, "adaptive", 2)
    assert cfg.model == tiny_model_dir and cfg.output_dir == str(run) and inv.changed == {}
    train(cfg, inv.resume)
    assert _metrics(run) == reference  # exact continuation
    assert (run / "config.yaml").read_text() == stored


def test_resume_refuses_flags_that_change_the_run(tiny_model_dir, data, tmp_path):
    run = tmp_path / "run"
    train(*parse(_args(tiny_model_dir, data, run, "--steps", "2")))  # finished; extended below
    with pytest.raises(UsageError, match=r"--lr 0\.5 \(the run has 0\.002\); --seed 1 \(the run has 3\)"):
        parse(["--resume", str(run), "--lr", "0.5", "--seed", "1"])
    # the same flags again are fine (a sweep re-sends them), as are the ones that may change
    cfg, resume = parse(_args(tiny_model_dir, data, run, "--resume", "--steps", "4", "--save-every", "3"))
    train(cfg, resume)
    log = _log(run)
    assert "--steps changed on --resume: 2 -> 4" in log and "--save-every changed on --resume: 2 -> 3" in log
    assert [m["step"] for m in _metrics(run)] == [1, 2, 3, 4]
    with pytest.raises(UsageError, match="--steps 3 is below the run's newest checkpoint, step 4"):
        parse(["--resume", str(run), "--steps", "3"])
    # the API refuses a config that differs from the run too
    other, _ = parse(_args(tiny_model_dir, data, run, "--lr", "0.1"))
    with pytest.raises(UsageError, match="--lr 0.1 .the run has 0.002."):
        train(other, "auto")


def test_resume_never_compares_two_evaluation_sets(tiny_model_dir, tmp_path, monkeypatch):
    from atesd.engine.lab import recipe

    def fake_eval(model, tokenizer, problems, task, **kw):
        return {"accuracy": 0.5, "per_level": {}, "n": len(problems), "n_samples": 1, "pass@k": {1: 0.5}}

    monkeypatch.setattr(evaluation_mod, "evaluate_task", fake_eval)
    args = [
        "--model", tiny_model_dir, "--data", "lab", "--task-option", "size=20", "--eval-problems", "4", "--steps", "3",
        "--batch-size", "2", "--max-new-tokens", "8", "--save-every", "1", "--probe-every", "0", "--no-progress",
        "--output-dir", str(tmp_path / "run"), "--stop-after", "1",
    ]  # fmt: skip
    run = train(*parse(args))
    with pytest.raises(UsageError, match="--eval-problems 8 .the run has 4."):
        parse(["--resume", run, "--eval-problems", "8"])
    real = recipe.lab_dataset  # the same config, but the held-out problems changed (a new generator version)
    monkeypatch.setattr(
        recipe, "lab_dataset", lambda split, n, seed=0, **kw: real(split, n, seed + (split == "test"), **kw)
    )
    with pytest.raises(UsageError, match="evaluation set lab differs"):
        train(*parse(["--resume", run]))
    assert not os.path.exists(os.path.join(run, "summary.json"))


# ---------------------------------------------------------------------------------------------- item 2
def test_nothing_written_outside_the_run_directory(tiny_model_dir, data, tmp_path):
    sandbox = tmp_path / "sandbox"
    run = sandbox / "runs" / "x"
    train(*parse(_args(tiny_model_dir, data, run, "--steps", "2", "--stop-after", "1", "--save-every", "5")))
    assert not (run / "checkpoints").exists()  # killed before its first checkpoint
    before = _tree(sandbox)
    train(*parse(["--resume", str(run)]))  # starts the run over with its own config, inside the run
    assert "no checkpoint under" in _log(run) and [m["step"] for m in _metrics(run)] == [1, 2]
    assert {p for p in _tree(sandbox) if not p.startswith("runs/x/")} == {
        p for p in before if not p.startswith("runs/x/")
    }
    plain = sandbox / "notes"
    plain.mkdir()
    (plain / "todo.txt").write_text("mine")
    for target in (plain, plain / "todo.txt", sandbox / "missing"):
        snapshot = _tree(sandbox)
        with pytest.raises(UsageError, match="--resume"):
            parse(["--resume", str(target)])
        assert _tree(sandbox) == snapshot
    with pytest.raises(UsageError, match="already holds a run"):  # a fresh run never overwrites checkpoints
        train(*parse(_args(tiny_model_dir, data, run)))


# ---------------------------------------------------------------------------------------------- item 3
KILL_DURING_WRITE = """
import builtins, os, signal, sys
import atesd.engine.run as r
import atesd.engine.train as t

class KillMidWrite:
    def __init__(self, fh):
        self.fh = fh
    def write(self, text):
        if text.startswith('{"step": 5,'):  # half of step 5's line reaches the disk, then SIGKILL
            self.fh.write(text[: len(text) // 2])
            self.fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return self.fh.write(text)
    def __getattr__(self, name):
        return getattr(self.fh, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return self.fh.__exit__(*exc)

def patched_open(path, mode="r", *a, **kw):
    fh = builtins.open(path, mode, *a, **kw)
    return KillMidWrite(fh) if str(path).endswith("metrics.jsonl") and "a" in mode else fh

r.open = patched_open
t.main(sys.argv[1:])
"""


def test_kill_during_a_metrics_write_then_resume(tiny_model_dir, data, tmp_path, reference):
    run = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-c", KILL_DURING_WRITE, *_args(tiny_model_dir, data, run)],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == -signal.SIGKILL, out.stderr
    raw = (run / "metrics.jsonl").read_text()
    assert not raw.endswith("\n") and raw.count("\n") == 4  # steps 1-4 and half of step 5
    train(*parse(["--resume", str(run)]))
    assert _metrics(run) == reference  # resumed from step 4, the half line dropped
    assert "metrics.jsonl: dropped 1 unreadable line(s) (line 5" in _log(run)


@pytest.mark.parametrize("damage", ["truncate_adapter", "truncate_state", "flip_adapter_byte", "drop_state"])
def test_damaged_newest_checkpoint_falls_back(tiny_model_dir, data, tmp_path, reference, damage):
    run = tmp_path / "run"
    train(*parse(_args(tiny_model_dir, data, run, "--stop-after", "4")))
    newest = run / "checkpoints" / "step-000004"
    target = newest / (checkpoint.STATE_FILE if "state" in damage else checkpoint.ADAPTER_FILE)
    raw = target.read_bytes()
    if damage == "drop_state":
        target.unlink()
    elif damage == "flip_adapter_byte":  # same size: only the manifest's hash can tell
        target.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    else:
        target.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UsageError, match=r"step-000004 is damaged: .*intact checkpoints: step-000002"):
        train(*parse(["--resume", str(newest)]))  # a checkpoint named explicitly is never replaced silently
    train(*parse(["--resume", str(run)]))
    log = _log(run)
    assert "step-000004 is damaged" in log and "falling back" in log and "resumed from" in log
    assert "step-000002 at step 2" in log
    assert _metrics(run) == reference


def test_every_checkpoint_damaged_is_an_error_not_a_restart(tiny_model_dir, data, tmp_path):
    run = tmp_path / "run"
    train(*parse(_args(tiny_model_dir, data, run, "--save-every", "1", "--stop-after", "2")))
    for step in (1, 2):
        adapter = run / "checkpoints" / f"step-{step:06d}" / checkpoint.ADAPTER_FILE
        adapter.write_bytes(adapter.read_bytes()[:100])
    with pytest.raises(UsageError, match=r"no intact checkpoint under .*step-000002: adapter_model.safetensors has"):
        train(*parse(["--resume", str(run)]))
    assert len(_metrics(run)) == 2  # the run's record is untouched


# ---------------------------------------------------------------------------------------------- item 6
def test_jsonl_with_bad_lines_is_read_and_counted(tiny_model_dir, tmp_path):
    good = write_dataset(tmp_path / "good.jsonl", n=6, extra_bad=False)
    lines = open(good, "rb").read().splitlines(keepends=True)
    bad = tmp_path / "mixed.jsonl"
    bad.write_bytes(
        lines[0] + b'{"problem": "cut off\n' + lines[1] + b'{"problem": "caf\xe9", "solution": "\\\\boxed{1}"}\n'
        + b"\n" + b"[1, 2]\n" + b"".join(lines[2:]) + b"not json at all\n"
    )  # fmt: skip
    records, skipped = read_records(str(bad))
    assert len(records) == 6
    assert skipped.lines == {"bad_json": [2, 11], "not_utf8": [4], "not_an_object": [6]}
    run = train(*parse(["--model", tiny_model_dir, "--data", str(bad), "--steps", "1", "--batch-size", "2",
                        "--max-new-tokens", "4", "--probe-every", "0", "--no-progress",
                        "--output-dir", str(tmp_path / "run")]))  # fmt: skip
    assert "skipped 4 of 10 lines: bad_json 2 (lines 2, 11), not_utf8 1 (line 4), not_an_object 1 (line 6)" in _log(
        run
    )


def test_file_without_a_usable_row_fails_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    junk = tmp_path / "junk.jsonl"
    junk.write_bytes(b'{"problem": \n\xff\xfe\n[3]\n')
    with pytest.raises(DataError, match=r"junk.jsonl' has no usable row .3 non-empty lines; skipped bad_json 1"):
        read_records(str(junk))

    def no_model(*a, **kw):
        raise AssertionError("the model loaded before the data was checked")

    monkeypatch.setattr(trainer_mod, "load_model", no_model)
    for path, match in ((junk, "no usable row"), (write_dataset(tmp_path / "nobox.jsonl", n=0), "no usable training")):
        run = tmp_path / f"run-{os.path.basename(str(path))}"
        with pytest.raises(DataError, match=match):
            train(*parse(["--model", tiny_model_dir, "--data", str(path), "--output-dir", str(run)]))
        assert not run.exists()  # a new run whose start fails on bad input leaves no directory (issue 27)
    cols = tmp_path / "cols.jsonl"
    cols.write_text('{"question": "1+1?", "answer_text": "\\\\boxed{2}"}\n')
    with pytest.raises(DataError, match="no row has both 'problem' and 'solution' .see --problem-column"):
        train(*parse(["--model", tiny_model_dir, "--data", str(cols), "--output-dir", str(tmp_path / "c")]))


# ---------------------------------------------------------------------------------------------- item 7
def test_a_crash_is_one_line_with_its_traceback_in_run_log(tiny_model_dir, data, tmp_path, monkeypatch, capsys):
    def boom(self):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(train_mod.Trainer, "step", boom)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        train_mod.main(_args(tiny_model_dir, data, run))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and "Traceback" not in "\n".join(err)
    assert err[-1] == f"error: RuntimeError: boom; second line (the traceback is in {run / 'run.log'})"
    log = _log(run)
    assert "run failed: RuntimeError: boom" in log and "Traceback (most recent call last)" in log
    with pytest.raises(RuntimeError, match="boom"):  # --debug: the exception itself
        train_mod.main(_args(tiny_model_dir, data, tmp_path / "debug", "--debug"))


# ------------------------------------------------------------------------------------------------ Ctrl-C
def test_ctrl_c_checkpoints_and_says_where(tiny_model_dir, data, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.train", *_args(tiny_model_dir, data, run, "--steps", "200",
                                                      "--save-every", "1000")],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    step = len(_metrics(run))
    ckpt = run / "checkpoints" / f"step-{step:06d}"
    assert last == f"stopped by SIGINT after step {step}; checkpoint {ckpt}; continue with --resume {run}"
    checkpoint.verify(str(ckpt))
    train(*parse(["--resume", str(run), "--steps", str(step + 1)]))
    assert [m["step"] for m in _metrics(run)] == list(range(1, step + 2))


# --------------------------------------------------------------------------------- issue 17: checkpoints
def test_checkpoint_is_portable_and_evaluates_elsewhere(tmp_path, monkeypatch):
    run = train(*parse(["--model", "tiny", "--data", "lab", "--task-option", "size=16", "--steps", "1", "--batch-size",
                        "2", "--eval-problems", "0", "--max-new-tokens", "8", "--probe-every", "0",
                        "--no-progress", "--output-dir", str(tmp_path / "run")]))  # fmt: skip
    ckpt = os.path.join(run, "checkpoints", "step-000001")
    files = set(os.listdir(ckpt))
    assert {"tokenizer.json", "tokenizer_config.json", checkpoint.MANIFEST_FILE, checkpoint.STATE_FILE} <= files
    assert checkpoint.base_model(ckpt) == "tiny"
    for name in files - {checkpoint.STATE_FILE, checkpoint.ADAPTER_FILE}:
        with open(os.path.join(ckpt, name), errors="replace") as fh:
            assert ROOT not in fh.read(), name  # no path into this checkout
    elsewhere = tmp_path / "elsewhere" / "my-adapter"
    shutil.copytree(ckpt, elsewhere)
    shutil.rmtree(run)
    monkeypatch.chdir(tmp_path)
    args = ["--benchmarks", "lab", "--lab-n", "4", "--n", "1", "--temperature", "0", "--max-new-tokens", "8",
            "--workers", "1"]  # fmt: skip
    summary = evaluate_mod.main(["--adapter", str(elsewhere), *args])  # base model from the checkpoint
    assert summary["model"] == "tiny" and summary["benchmarks"]["lab"]["n"] == 4
    outs = os.listdir(tmp_path / "runs")  # the default output: under runs/, never ./eval_out
    assert len(outs) == 1 and outs[0].startswith("eval-") and not (tmp_path / "eval_out").exists()
    assert os.path.exists(tmp_path / "runs" / outs[0] / "lab.jsonl")


def test_evaluate_writes_a_checkpoints_results_into_its_run(tiny_model_dir, data, tmp_path, monkeypatch):
    run = train(*parse(_args(tiny_model_dir, data, tmp_path / "run", "--steps", "2")))
    monkeypatch.chdir(tmp_path)
    ckpt = os.path.join(run, "checkpoints", "step-000002")
    bench = tmp_path / "b.jsonl"
    bench.write_text(json.dumps({"problem": "(1+2)*3?", "answer": "9"}) + "\n")
    evaluate_mod.main(["--adapter", ckpt, "--data", str(bench), "--n", "1", "--temperature", "0",
                       "--max-new-tokens", "4", "--workers", "1"])  # fmt: skip
    assert os.path.exists(os.path.join(run, "eval", "step-000002", "summary.json"))
    assert sorted(os.listdir(tmp_path)) == ["b.jsonl", "run"]


# ----------------------------------------------------------------------------------- issue 17: wandb
def test_report_to_wandb(tiny_model_dir, data, tmp_path, monkeypatch):
    calls = {"init": [], "log": [], "finish": 0}

    class Run:
        def log(self, scalars, step):
            calls["log"].append((step, scalars))

        def finish(self):
            calls["finish"] += 1

    def init(**kw):
        calls["init"].append(kw)
        return Run()

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = tmp_path / "run"
    train(*parse(_args(tiny_model_dir, data, run, "--steps", "2", "--report-to", "wandb", "--stop-after", "1",
                        "--save-every", "1")))
    train(*parse(["--resume", str(run)]))
    first, second = calls["init"]
    assert first["id"] == second["id"] and first["resume"] == "allow" and first["dir"] == str(run)
    assert first["config"]["lr"] == 2e-3 and "stop_after" not in first["config"]
    assert [s for s, _ in calls["log"]] == [1, 2] and "loss" in calls["log"][0][1] and calls["finish"] == 2
    assert not (run / "tb").exists()  # tensorboard only when asked for (it is the default)


# ------------------------------------------------------------------------------- controller.simulate
def test_controller_simulate_leaves_the_docs_figure_alone(tmp_path, monkeypatch):
    from atesd.controller import simulate

    monkeypatch.chdir(tmp_path)
    simulate.main(["--seeds", "1", "--steps", "60"])
    assert os.listdir(tmp_path / "runs") == ["controller_sim.png"] and not (tmp_path / "docs").exists()
