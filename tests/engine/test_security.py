"""A run directory or checkpoint from someone else is data, never code (issue 30).

Hostile files, each refused with a one-line error, nothing executed and nothing written outside the run: a pickled
``trainer_state.pt`` whose unpickling would run a command and create a file, a manifest naming a file outside its
checkpoint, symbolic links in a checkpoint or run, truncated safetensors files, malformed trainer-state JSON, a
``config.yaml`` with a ``!!python/object`` tag, a pickled adapter. Beside them: the trainer state round-trips exactly
(types included), a legacy checkpoint converts and resumes bit-exactly, and no module of the engine calls an
unpickler or an unsafe loader outside the explicit conversion."""

import ast
import hashlib
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
from collections import Counter, deque

import numpy as np
import pytest
import torch
from engine_tiny import write_dataset
from safetensors.torch import save_file

import atesd.engine.evaluate as evaluate_mod
import atesd.engine.train as train_mod
from atesd.engine import checkpoint
from atesd.engine.errors import UsageError
from atesd.engine.invocation import parse
from atesd.engine.train import train
from atesd.engine.trainer import TIMING_METRICS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMING = TIMING_METRICS
STEP2 = os.path.join("checkpoints", "step-000002")


# ----------------------------------------------------------------------------------------------- helpers
class RunCommand:
    """Unpickling this runs a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class CreateFile:
    """Unpickling this creates (truncates) a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _args(model_dir, data, out, *extra):
    return [
        "--model", model_dir, "--data", data, "--output-dir", str(out), "--exposure", "adaptive", "--steps", "4",
        "--batch-size", "2", "--micro-batch", "1", "--max-new-tokens", "8", "--lr", "2e-3", "--seed", "3",
        "--save-every", "2", "--probe-every", "3", "--probe-size", "2", "--controller-hold", "2",
        "--controller-lookahead", "3", "--no-progress", *extra,
    ]  # fmt: skip


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in fh]


def _outside(root, run):
    """{path: sha256} of every file under ``root`` except inside ``run``: what a hostile run could touch."""
    out = {}
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if os.path.join(d, x) != str(run)]
        for f in files:
            p = os.path.join(d, f)
            if not os.path.islink(p):
                with open(p, "rb") as fh:
                    out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _cli(main, argv, capsys):
    """(exit code, stderr) of an in-process CLI call."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code, capsys.readouterr().err


def _one_line_error(code, err, *needles):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _legacy(ckpt, state):
    """Make ``ckpt`` look written by an earlier atesd: ``state`` pickled in trainer_state.pt, a fresh manifest."""
    for name in (checkpoint.STATE_FILE, checkpoint.STATE_TENSORS):
        os.remove(os.path.join(ckpt, name))
    torch.save(state, os.path.join(ckpt, checkpoint.LEGACY_STATE_FILE))
    checkpoint.write_manifest(ckpt, 2, "tiny")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "train.jsonl", n=24)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, data, tmp_path_factory):
    """The uninterrupted 4-step run's metrics."""
    return _metrics(train(*parse(_args(tiny_model_dir, data, tmp_path_factory.mktemp("ref") / "run"))))


@pytest.fixture(scope="module")
def stopped(tiny_model_dir, data, tmp_path_factory):
    """A run stopped after step 2 (checkpoint step-000002); each test works on its own copy."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    train(*parse(_args(tiny_model_dir, data, run, "--stop-after", "2")))
    return str(run)


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    """Each test works in its tmp directory: whatever a refusal wrote to the working directory would show."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def run(stopped, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(stopped, copy)
    return copy


# ------------------------------------------------------------------------------------------ the format
def test_trainer_state_round_trips_exactly_as_data(tmp_path):
    random.seed(11)
    np.random.seed(12)
    np.random.normal()  # numpy caches a Gaussian: has_gauss = 1
    torch.manual_seed(13)
    base = torch.arange(12, dtype=torch.float32)
    state = {
        "step": 7, "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(3, 4)}},
                                 "param_groups": [{"betas": (0.9, 0.999), "params": [0], "foreach": None}]},
        "scheduler": {"_last_lr": [1e-3], "lr_lambdas": [{}]}, "teacher": {"kind": "ema", "ema": {}},
        "controller": {"rng": random.Random(5).getstate(), "points": [(0, 0.5), (2, 1 / 3)], "cur": None,
                       "last": {"alpha": float("nan")}, "ema": {"loss": None}, "floats": [-0.0, 1e-310, 0.1 + 0.2],
                       "inf": (float("inf"), float("-inf")), "$odd": {"$tensor": "not a reference"}},
        "data": {"epoch": 1, "index": 3}, "skipped": {"too_long": 2}, "rng": checkpoint.rng_state(),
        "tensors": [torch.zeros(0), torch.tensor(True), torch.ones(2, 2, dtype=torch.bfloat16),
                    torch.arange(5, dtype=torch.int64), torch.randn(3, 4).t(), base[:6], base[6:]],
        "big": 2**80, "flags": [True, False], "text": "ünïcode \x00 \"quoted\"", np.int64(4).item(): "int key",
    }  # fmt: skip
    checkpoint.write_state(str(tmp_path), state)
    assert sorted(os.listdir(tmp_path)) == [checkpoint.STATE_FILE, checkpoint.STATE_TENSORS]
    with open(tmp_path / checkpoint.STATE_FILE) as fh:
        doc = json.load(fh)  # plain, strict JSON
    assert doc["format"] == checkpoint.STATE_FORMAT and doc["version"] == checkpoint.STATE_VERSION
    back = checkpoint.read_state(str(tmp_path))

    def same(a, b, path="/"):
        assert type(a) is type(b), (path, type(a), type(b))
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
        elif isinstance(a, dict):
            assert list(a) == list(b), path
            for k in a:
                same(a[k], b[k], f"{path}{k}/")
        elif isinstance(a, (list, tuple)):
            assert len(a) == len(b), path
            for i, (x, y) in enumerate(zip(a, b)):
                same(x, y, f"{path}{i}/")
        elif isinstance(a, float):
            assert (a != a and b != b) or (a == b and str(a) == str(b)), (path, a, b)  # -0.0 stays -0.0
        else:
            assert a == b, (path, a, b)

    same(state, back)
    # the restored RNG states continue every stream exactly where the saved ones would have
    checkpoint.set_rng_state(state["rng"])
    expected = (random.random(), np.random.normal(), np.random.randint(1 << 30), torch.rand(3))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    checkpoint.set_rng_state(back["rng"])
    got = (random.random(), np.random.normal(), np.random.randint(1 << 30), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_a_state_that_is_not_data_is_not_written(tmp_path):
    with pytest.raises(TypeError, match=r"trainer state /controller/fn: a builtins.function is not data"):
        checkpoint.encode_state({"controller": {"fn": lambda: 0}})
    with pytest.raises(TypeError, match="neither str nor int"):
        checkpoint.encode_state({"x": {(1, 2): 3}})
    with pytest.raises(TypeError, match="is not data"):  # refused before the model or anything else is written
        checkpoint.save(str(tmp_path), 1, None, {"step": 1, "x": Counter, "rng": {}})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "doc,message",
    [
        ("{", "trainer_state.json is unreadable"),
        ('{"format": "other", "version": 1, "state": {}}', "is not an atesd trainer state"),
        ('{"format": "atesd.trainer_state", "version": 99, "state": {}}', "format version 99"),
        ("[" * 200_000 + "]" * 200_000, "trainer_state.json is unreadable"),
        ('{"format": "atesd.trainer_state", "version": 1, "state": NaN}', "NaN is not JSON"),
        ('{"format": "atesd.trainer_state", "version": 1, "state": {"x": {"$pickle": "gASV"}}}', "unknown tag"),
        ('{"format": "atesd.trainer_state", "version": 1, "state": {"x": {"$tensor": "nope"}}}', "not in"),
        ('{"format": "atesd.trainer_state", "version": 1, "state": {"a": {"$tensor": "t"}, "b": {"$tensor": "t"}}}',
         "referenced twice"),
        ('{"format": "atesd.trainer_state", "version": 1, "state": {"$dict": [[[1], 2]]}}', "neither str nor int"),
        ('{"format": "atesd.trainer_state", "version": 1, "state": {"$float": "1e999"}}', "$float must be"),
        ('{"format": "atesd.trainer_state", "version": 1, "state": {"a": {"$tensor": "t"}}}', "'step' is missing"),
    ],
)  # fmt: skip
def test_a_malformed_trainer_state_is_refused_in_one_line(tmp_path, doc, message):
    save_file({"t": torch.zeros(2)}, str(tmp_path / checkpoint.STATE_TENSORS))
    (tmp_path / checkpoint.STATE_FILE).write_text(doc)
    with pytest.raises(checkpoint.BrokenCheckpoint) as info:
        checkpoint.read_state(str(tmp_path))
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


# ----------------------------------------------------------------------------- hostile trainer_state.pt
def test_a_pickled_trainer_state_is_never_unpickled(run, tmp_path, capsys):
    ckpt = run / STEP2
    ran, created = tmp_path / "command-ran", tmp_path / "file-created"
    _legacy(ckpt, {"step": 2, "a": RunCommand(f"touch {ran}"), "b": CreateFile(str(created))})
    before = _outside(tmp_path, run)
    pickled = (ckpt / checkpoint.LEGACY_STATE_FILE).read_bytes()

    code, err = _cli(train_mod.main, ["--resume", str(run)], capsys)
    _one_line_error(code, err, "trainer_state.pt, a pickle", "python -m engine.checkpoint convert")
    # the conversion reads tensors, containers and numbers only: it refuses, naming the opt-in, and changes nothing
    assert checkpoint.main(["convert", str(run)]) == 2
    _one_line_error(2, capsys.readouterr().err, "not converted", "--trust")
    assert not ran.exists() and not created.exists()
    assert _outside(tmp_path, run) == before
    assert (ckpt / checkpoint.LEGACY_STATE_FILE).read_bytes() == pickled
    assert not (ckpt / checkpoint.STATE_FILE).exists()

    # the payload is live: full unpickling (what the engine did before) runs it
    subprocess.run(
        [sys.executable, "-c", f"import torch; torch.load({str(ckpt / checkpoint.LEGACY_STATE_FILE)!r}, "
         "weights_only=False)"], check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert ran.exists() and created.exists()


def test_the_cli_refuses_a_pickled_state_in_one_line(run, tmp_path):
    """The same refusal from real processes: ``python -m engine.train`` and ``python -m engine.checkpoint``."""
    ran = tmp_path / "command-ran"
    _legacy(run / STEP2, {"step": 2, "a": RunCommand(f"touch {ran}")})
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for module, args in (("engine.train", ["--resume", str(run), "--no-progress"]),
                         ("engine.checkpoint", ["convert", str(run)])):  # fmt: skip
        out = subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
        # (transformers may warn on stderr while the model loads; the error is the last line, and the only one)
        errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert len(errors) == 1 and out.stderr.strip().splitlines()[-1] == errors[0], out.stderr
        assert "trainer_state.pt" in errors[0], errors[0]
    assert not ran.exists()


def test_a_legacy_checkpoint_converts_and_resumes_exactly(run, reference, tmp_path):
    ckpt = run / STEP2
    state = checkpoint.read_state(str(ckpt))
    name, key, pos, has_gauss, gauss = state["rng"]["numpy"]
    state["rng"]["numpy"] = (name, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss)  # as np.random had it
    _legacy(ckpt, state)
    with pytest.raises(checkpoint.LegacyCheckpoint, match=r"convert it once .*python -m engine.checkpoint convert"):
        train(*parse(["--resume", str(run)]))
    assert checkpoint.convert(str(run)) == [str(ckpt)]
    assert not (ckpt / checkpoint.LEGACY_STATE_FILE).exists()
    checkpoint.verify(str(ckpt))  # the manifest lists the new files
    assert checkpoint.convert(str(run)) == []  # nothing left to convert
    train(*parse(["--resume", str(run)]))
    assert _metrics(run) == reference  # steps 3-4 as in the uninterrupted run, every metric

    # a pickle holding more than tensors, containers and numbers converts only with --trust
    other = tmp_path / "other" / "step-000002"
    shutil.copytree(ckpt, other)
    state = checkpoint.read_state(str(other))
    state["skipped"] = Counter(state["skipped"])  # (restricted unpickling builds a Counter: torch allows it)
    state["controller"]["history"] = deque(state["controller"]["history"])  # (but no deque)
    _legacy(other, state)
    with pytest.raises(UsageError, match=r"not converted: .*convert --trust"):
        checkpoint.convert(str(other))
    assert checkpoint.main(["convert", "--trust", str(other)]) == 0
    back = checkpoint.read_state(str(other))
    assert back["skipped"] == dict(state["skipped"])
    assert back["controller"]["history"] == list(state["controller"]["history"])


# ------------------------------------------------------------------------- manifests, links, truncation
@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_a_manifest_naming_a_file_outside_the_checkpoint_is_refused(run, tmp_path, capsys, where):
    secret = tmp_path / "secret.txt"
    secret.write_text("not the checkpoint's\n")
    ckpt = run / STEP2
    rel = os.path.relpath(secret, ckpt) if where == "relative" else str(secret)
    assert rel.startswith("../../") or where == "absolute"
    manifest = json.loads((ckpt / checkpoint.MANIFEST_FILE).read_text())
    size, sha = secret.stat().st_size, hashlib.sha256(secret.read_bytes()).hexdigest()
    manifest["files"][rel] = {"bytes": size, "sha256": sha}  # right size and hash: only the path gives it away
    (ckpt / checkpoint.MANIFEST_FILE).write_text(json.dumps(manifest))
    before = _outside(tmp_path, run)

    with pytest.raises(checkpoint.BrokenCheckpoint, match="which is not a file inside the checkpoint"):
        checkpoint.verify(str(ckpt))
    code, err = _cli(train_mod.main, ["--resume", str(ckpt)], capsys)
    _one_line_error(code, err, "step-000002 is damaged: manifest.json names", "not a file inside the checkpoint")
    code, err = _cli(evaluate_mod.main, ["--adapter", str(ckpt), "--benchmarks", "lab"], capsys)
    _one_line_error(code, err, "not a file inside the checkpoint")
    assert _outside(tmp_path, run) == before


@pytest.mark.parametrize("target", [checkpoint.ADAPTER_FILE, checkpoint.STATE_TENSORS, "step-000002"])
def test_a_symbolic_link_in_a_checkpoint_is_refused(run, tmp_path, capsys, target):
    """The link points at an identical copy, so sizes and hashes match: only the link itself is refused."""
    ckpt = run / STEP2
    elsewhere = tmp_path / "elsewhere"
    if target == "step-000002":  # the whole checkpoint directory, linked from the run
        shutil.move(ckpt, elsewhere)
        os.symlink(elsewhere, ckpt)
        message = "checkpoints/step-000002 is a symbolic link leading outside the run"
    else:
        shutil.move(ckpt / target, elsewhere)
        os.symlink(elsewhere, ckpt / target)
        message = f"{target} is a symbolic link"
    before = _outside(tmp_path, run)
    code, err = _cli(train_mod.main, ["--resume", str(run)], capsys)
    _one_line_error(code, err, message)
    if target == checkpoint.ADAPTER_FILE:
        code, err = _cli(evaluate_mod.main, ["--adapter", str(ckpt), "--benchmarks", "lab"], capsys)
        _one_line_error(code, err, message)
    assert _outside(tmp_path, run) == before


def test_a_link_inside_the_run_that_stays_inside_is_accepted(run):
    """wandb keeps links such as wandb/latest-run inside its directory: they cannot lead out of the run."""
    os.makedirs(run / "wandb" / "run-1")
    os.symlink(run / "wandb" / "run-1", run / "wandb" / "latest-run")
    checkpoint.check_run_dir(str(run))
    os.symlink("/", run / "wandb" / "escape")
    with pytest.raises(UsageError, match="wandb/escape is a symbolic link leading outside the run"):
        checkpoint.check_run_dir(str(run))


@pytest.mark.parametrize("target", [checkpoint.ADAPTER_FILE, checkpoint.STATE_TENSORS])
def test_a_truncated_safetensors_file_is_refused(run, tmp_path, capsys, target):
    """Truncated and the manifest rewritten to match, so only the safetensors parser can tell."""
    ckpt = run / STEP2
    raw = (ckpt / target).read_bytes()
    (ckpt / target).write_bytes(raw[: len(raw) // 2])
    checkpoint.write_manifest(str(ckpt), 2, "tiny")
    before = _outside(tmp_path, run)
    code, err = _cli(train_mod.main, ["--resume", str(run)], capsys)
    _one_line_error(code, err, f"step-000002: {target} is unreadable")
    if target == checkpoint.ADAPTER_FILE:
        code, err = _cli(evaluate_mod.main, ["--adapter", str(ckpt), "--benchmarks", "lab"], capsys)
        _one_line_error(code, err, f"{target} is unreadable")
    assert _outside(tmp_path, run) == before


# ---------------------------------------------------------------------------------- config.yaml, adapters
def test_a_config_yaml_with_a_python_tag_is_refused(run, tmp_path, capsys):
    ran = tmp_path / "command-ran"
    config = run / "config.yaml"
    text = config.read_text().replace("seed: 3\n", f"seed: !!python/object/apply:os.system ['touch {ran}']\n")
    assert "!!python/object" in text
    config.write_text(text)
    before = _outside(tmp_path, run)
    code, err = _cli(train_mod.main, ["--resume", str(run)], capsys)
    _one_line_error(code, err, "config.yaml", "not valid YAML", "could not determine a constructor")
    code, err = _cli(train_mod.main, ["--config", str(config), "--output-dir", str(tmp_path / "new")], capsys)
    _one_line_error(code, err, "not valid YAML")
    assert not ran.exists() and _outside(tmp_path, run) == before
    # the payload is live: an unsafe YAML loader runs it
    subprocess.run([sys.executable, "-c", f"import yaml; yaml.unsafe_load(open({str(config)!r}))"], check=True)
    assert ran.exists()


def test_a_pickled_adapter_is_refused(tiny_model_dir, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / checkpoint.ADAPTER_CONFIG).write_text(json.dumps({"base_model_name_or_path": tiny_model_dir,
                                                                "peft_type": "LORA"}))  # fmt: skip
    ran = tmp_path / "command-ran"
    with open(adapter / checkpoint.ADAPTER_PICKLE, "wb") as fh:
        pickle.dump(RunCommand(f"touch {ran}"), fh)
    code, err = _cli(evaluate_mod.main, ["--adapter", str(adapter), "--benchmarks", "lab"], capsys)
    _one_line_error(code, err, "adapter_model.bin, a pickle, which is not read")
    assert not ran.exists() and sorted(os.listdir(tmp_path)) == ["adapter"]



# Beyond the checkpoint files: the task a run's config.yaml names, and the links of a resumed run.
def test_a_task_module_named_by_a_runs_config_is_not_imported(run, tmp_path, capsys, monkeypatch):
    name = f"atesd_hostile_task_{os.getpid()}"
    imported = tmp_path / "module-imported"
    (tmp_path / f"{name}.py").write_text(f"open({str(imported)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # `python -m engine.train` puts the working directory first
    config = run / "config.yaml"
    text = config.read_text()
    assert "task: math\n" in text
    config.write_text(text.replace("task: math\n", f"task: {name}:TASK\n"))
    try:
        code, err = _cli(train_mod.main, ["--resume", str(run)], capsys)
    finally:
        sys.modules.pop(name, None)
    assert not imported.exists()
    _one_line_error(code, err, "--task")


def test_a_run_log_linking_out_of_the_run_receives_nothing(run, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    os.remove(run / "run.log")
    os.symlink(victim, run / "run.log")
    code, err = _cli(train_mod.main, ["--resume", str(run)], capsys)
    _one_line_error(code, err, "run.log is a symbolic link leading outside the run")
    assert victim.read_text() == "precious\n"

# ------------------------------------------------------------------------------------------ the code itself
UNSAFE = ("torch.load", "eval", "exec", "marshal.loads", "yaml.load", "yaml.unsafe_load", "yaml.full_load",
          "shelve.open", "dill.load", "dill.loads", "joblib.load", "np.load", "numpy.load")


def _unsafe_calls(tree: ast.AST) -> list[tuple[str, int, str]]:
    """(call, line, enclosing function) of every unpickler or unsafe loader call in a module."""
    found, scope = [], []

    class Visitor(ast.NodeVisitor):
        def visit_FunctionDef(self, node):
            scope.append(node.name)
            self.generic_visit(node)
            scope.pop()

        visit_AsyncFunctionDef = visit_FunctionDef

        def visit_Call(self, node):
            f = node.func
            name = (
                f"{f.value.id}.{f.attr}" if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                else f.id if isinstance(f, ast.Name) else ""
            )  # fmt: skip
            if name in UNSAFE or name.endswith("Unpickler") or (name.startswith("pickle.") and "load" in name):
                found.append((name, node.lineno, scope[-1] if scope else "<module>"))
            self.generic_visit(node)

    Visitor().visit(tree)
    return found


def test_nothing_in_the_engine_unpickles_or_loads_yaml_unsafely():
    calls = []
    for package in ("engine", "controller", "kernels"):
        for d, _, files in os.walk(os.path.join(ROOT, package)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(d, f)
                    with open(path, encoding="utf-8") as fh:
                        tree = ast.parse(fh.read(), path)
                    calls += [(os.path.relpath(path, ROOT), *c) for c in _unsafe_calls(tree)]
    # the one unpickler: converting a legacy checkpoint, asked for explicitly (weights_only unless --trust)
    assert [(p, name, fn) for p, name, _, fn in calls] == [
        ("engine/checkpoint.py", "torch.load", "read_legacy_state"),
        ("engine/checkpoint.py", "torch.load", "read_legacy_state"),
    ], calls
