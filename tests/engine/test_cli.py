"""CLI: --help documents every option, presets resolve to recipes, an unloadable model fails fast by name; every
bad flag, YAML value or input file of `engine.train` and `engine.evaluate` is one line on stderr, exit code 2."""

import dataclasses
import os
import subprocess
import sys

import pytest
import yaml
from engine_tiny import write_dataset

from atesd.engine.config import Config
from atesd.engine.errors import UsageError
from atesd.engine.invocation import parse
from atesd.engine.models import ModelLoadError, load_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args, env=None, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "engine.train", *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT, **(env or {})},
        timeout=120,
    )


def test_help_documents_every_flag():
    out = _run("--help")
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for f in dataclasses.fields(Config):
        assert "--" + f.name.replace("_", "-") in text, f.name
    for flag in ("--config", "--resume"):
        assert flag in text


@pytest.mark.parametrize(
    "model,clip,hub",
    [
        ("qwen3-8b", 0.06, "Qwen/Qwen3-8B"),
        ("qwen3-1.7b", 0.05, "Qwen/Qwen3-1.7B"),
        ("qwen3-4b", 0.05, "Qwen/Qwen3-4B"),
    ],
)
def test_presets_resolve_to_recipe(model, clip, hub):
    cfg, _ = parse(["--model", model])
    assert cfg.clip == clip and cfg.lr == 5e-6 and (cfg.lora_r, cfg.lora_alpha) == (64, 128)
    assert cfg.max_new_tokens == 1024 and cfg.num_samples == 1 and cfg.top_k == 20
    assert cfg.data == "siyanzhao/Openthoughts_math_30k_opsd" and cfg.kl_temperature == 1.1
    assert parse(["--model", model, "--clip", "0.1"])[0].clip == 0.1
    from atesd.engine.models import resolve_model_path

    assert resolve_model_path(model) == hub


def test_no_model_means_tiny_on_lab():
    cfg, _ = parse([])
    assert cfg.model == "tiny" and cfg.data == "lab" and cfg.lr > 5e-6


def test_offline_fails_fast_naming_the_model(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="nobody/no-such-model-xyz"):
        load_model("nobody/no-such-model-xyz")
    data = write_dataset(tmp_path / "d.jsonl", n=4)
    run = tmp_path / "run"
    args = ("--model", "qwen3-8b", "--data", data, "--exposure", "full", "--output-dir", str(run),
            "--eval-benchmarks", "")  # the recipe's hub benchmarks would fail first, offline
    out = _run(*args, env={"HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2 and "qwen3-8b" in out.stderr and "Qwen/Qwen3-8B" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "--model DIR" in out.stderr  # what to do instead
    assert not run.exists()  # a run that never started leaves no directory behind


# ------------------------------------------------------------------------------------- bad input, one line
def _setup_inputs(root):
    """Files and directories the bad-flag cases point at (all under ``root``)."""
    (root / "empty-model").mkdir()
    (root / "a-file").write_text("not a directory")
    (root / "notes").mkdir()
    (root / "notes" / "x.txt").write_text("not a run")
    (root / "junk.jsonl").write_bytes(b'{"problem": \n\xff\n[1]\n')
    (root / "bad.yaml").write_text("lr: fast\n")
    (root / "list.yaml").write_text("- lr: 1e-3\n")
    (root / "broken.yaml").write_text("lr: 1e-3\nsteps: [1, 2\n")
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(Config().resolve().run_dict()))
    (run / "checkpoints" / "step-000004").mkdir(parents=True)
    return root


# (flags, text the one-line message must contain); {T} is the inputs directory. The cases issue 18 lists run as
# real `python -m engine.train` processes; the rest go through the same main() in this process (no torch import).
TRAIN_PROCESS = [
    (["--steps", "-3"], "--steps: must be >= 1, got -3"),
    (["--save-every", "0"], "--save-every: must be >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    (["--micro-batch", "0"], "--micro-batch: must be >= 1, got 0"),
    (["--num-samples", "0"], "--num-samples: must be >= 1, got 0"),
    (["--top-p", "0"], "--top-p: must be in (0, 1]"),
    (["--model", "{T}/no-such-model"], "no such model directory"),
    (["--model", "{T}/empty-model"], "the model directory is empty"),
    (["--dtype", "float64"], "--dtype: 'float64' is not one of auto, float32, bfloat16, float16"),
    (["--device", "cuda"], "CUDA is not available on this machine"),
    (["--output-dir", "{T}/a-file"], "--output-dir '{T}/a-file': is a file, not a directory"),
    (["--data", "{T}/junk.jsonl", "--output-dir", "{T}/out"], "junk.jsonl' has no usable row"),
]
TRAIN_IN_PROCESS = [
    (["--steps", "two"], "--steps: expected an integer, got 'two'"),
    (["--steps", "2.5"], "--steps: expected an integer"),
    (["--top-k", "-1"], "--top-k: must be >= 0"),
    (["--clip", "-0.1"], "--clip: must be > 0"),
    (["--beta", "1.5"], "--beta: must be in [0, 1]"),
    (["--kl-temperature", "0"], "--kl-temperature: must be > 0"),
    (["--lr", "nan"], "--lr: expected a number, got 'nan'"),
    (["--learning_rate", "-1"], "--learning_rate: must be > 0"),
    (["--seed", "-1"], "--seed: must be >= 0"),
    (["--task-option", "levels=1,9"], "--task-option levels: must name levels among 1,2,3,4"),
    (["--model", "{T}/a-file"], "is a file"),
    (["--device", "tpu"], "--device 'tpu': not a device"),
    (["--data", "{T}/missing.jsonl"], "--data '{T}/missing.jsonl': no such file"),
    (["--exposure", "sometimes"], "--exposure 'sometimes': unknown exposure spec"),
    (["--controller-estimator", "level", "--controller-signal", "loss"], "estimator='level' needs a measured signal"),
    (["--eval-benchmarks", "aime99"], "unknown benchmark 'aime99'"),
    (["--report-to", "mlflow"], "--report-to 'mlflow': use tensorboard, wandb"),
    (["--report-to", "wandb"], "the wandb package is not installed"),
    (["--stepz", "3"], "unknown flag --stepz (did you mean --steps?)"),
    (["--out", "d"], "unknown flag --out (did you mean --output-dir?)"),  # a prefix names the flag it starts
    (["--per_device_train_batch_size", "8"], "use --micro-batch"),
    (["--steps"], "--steps: expected one argument"),
    (["stray"], "unexpected argument 'stray'"),
    (["--config", "{T}/bad.yaml"], "{T}/bad.yaml: lr: expected a number, got 'fast'"),
    (["--config", "{T}/list.yaml"], "expected a mapping of option: value, got a list"),
    (["--config", "{T}/broken.yaml"], "not valid YAML at line 3"),
    (["--config", "{T}/none.yaml"], "config file '{T}/none.yaml' does not exist"),
    (["--resume", "{T}/notes"], "is not a run directory (no config.yaml)"),
    (["--resume", "{T}/missing"], "--resume '{T}/missing': no such directory"),
    (["--resume"], "--resume without a directory needs --output-dir"),
    (["--resume", "{T}/run", "--lr", "0.5"], "--lr 0.5 (the run has 0.001)"),
    (["--output-dir", "{T}/run"], "already holds a run (newest checkpoint step-000004)"),
]
EVALUATE_PROCESS = [
    (["--benchmarks", "lab", "--n", "0"], "--n: must be >= 1, got 0"),
    (["--benchmarks", "lab", "--model", "{T}/no-such-model"], "no such model directory"),
    (["--benchmarks", "lab", "--dtype", "float64"], "--dtype: must be one of auto"),
    (["--benchmarks", "lab", "--adapter", "{T}/missing"], "--adapter '{T}/missing': no such directory"),
    (["--data", "{T}/junk.jsonl"], "junk.jsonl' has no usable row"),
]
EVALUATE_IN_PROCESS = [
    (["--benchmarks", "lab", "--n", "many"], "--n: invalid int value: 'many'"),
    (["--benchmarks", "lab", "--top-p", "0"], "--top-p: must be in (0, 1]"),
    (["--benchmarks", "lab", "--temperature", "-1"], "--temperature: must be >= 0"),
    (["--benchmarks", "lab", "--batch-size", "0"], "--batch-size: must be >= 1"),
    (["--benchmarks", "lab", "--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
    (["--benchmarks", "lab", "--device", "cuda"], "CUDA is not available on this machine"),
    (["--benchmarks", "lab", "--model", "{T}/empty-model"], "the model directory is empty"),
    (["--benchmarks", "lab", "--adapter", "{T}/notes"], "records no base model; give --model"),
    (["--benchmarks", "lab", "--out", "{T}/a-file"], "--out '{T}/a-file' is a file"),
    (["--data", "{T}/missing.jsonl"], "--data '{T}/missing.jsonl': no such file"),
    (["--benchmarks", "aime99"], "unknown benchmark 'aime99'"),
    ([], "give --benchmarks and/or --data"),
    (["--benchmarks", "lab", "--bogus"], "unrecognized arguments: --bogus"),
]


def _skip_reason(flags):
    import importlib.util

    import torch

    if "cuda" in flags and torch.cuda.is_available():
        return "this machine has CUDA"
    if "wandb" in flags and importlib.util.find_spec("wandb") is not None:
        return "wandb is installed"
    return None


def _run_all(module, cases, root):
    """Every case as its own `python -m <module>` process, two at a time (each pays a torch import)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(flags):
        args = [a.replace("{T}", str(root)) for a in flags]
        return subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=root, capture_output=True, text=True, timeout=300,
            env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip

    todo = [flags for flags, _ in cases if not _skip_reason(flags)]
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(map(tuple, todo), pool.map(one, todo)))


def _in_process(main, flags, root, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([a.replace("{T}", str(root)) for a in flags])
    return subprocess.CompletedProcess(flags, exit_info.value.code, "", capsys.readouterr().err)


def _assert_one_line(out, message, root):
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("error: ") and message.replace("{T}", str(root)) in lines[0], lines[0]
    assert "network" not in lines[0] and "hub is unreachable" not in lines[0]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return _setup_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def train_processes(inputs):
    return _run_all("engine.train", TRAIN_PROCESS, inputs)


@pytest.mark.parametrize("flags,message", TRAIN_PROCESS, ids=[" ".join(f) for f, _ in TRAIN_PROCESS])
def test_bad_train_flag_in_a_process(train_processes, inputs, flags, message):
    if _skip_reason(flags):
        pytest.skip(_skip_reason(flags))
    _assert_one_line(train_processes[tuple(flags)], message, inputs)


@pytest.mark.parametrize("flags,message", TRAIN_IN_PROCESS, ids=[" ".join(f) for f, _ in TRAIN_IN_PROCESS])
def test_bad_train_flag(inputs, capsys, flags, message):
    if _skip_reason(flags):
        pytest.skip(_skip_reason(flags))
    from atesd.engine.train import main

    _assert_one_line(_in_process(main, flags, inputs, capsys), message, inputs)


def test_bad_input_writes_nothing(train_processes, inputs):
    """Validation happens before anything is written; a new run whose start fails on bad input (here: a data file
    with no usable row, found when it is read) removes the run directory it made."""
    assert sorted(os.listdir(inputs)) == sorted(
        ["empty-model", "a-file", "notes", "junk.jsonl", "bad.yaml", "list.yaml", "broken.yaml", "run"]
    )
    assert sorted(os.listdir(inputs / "run")) == ["checkpoints", "config.yaml"]


@pytest.fixture(scope="module")
def evaluate_processes(inputs):
    return _run_all("engine.evaluate", EVALUATE_PROCESS, inputs)


@pytest.mark.parametrize("flags,message", EVALUATE_PROCESS, ids=[" ".join(f) for f, _ in EVALUATE_PROCESS])
def test_bad_evaluate_flag_in_a_process(evaluate_processes, inputs, flags, message):
    _assert_one_line(evaluate_processes[tuple(flags)], message, inputs)
    assert "eval_out" not in os.listdir(inputs)


@pytest.mark.parametrize("flags,message", EVALUATE_IN_PROCESS, ids=[" ".join(f) for f, _ in EVALUATE_IN_PROCESS])
def test_bad_evaluate_flag(inputs, capsys, flags, message):
    if _skip_reason(flags):
        pytest.skip(_skip_reason(flags))
    from atesd.engine.evaluate import main

    _assert_one_line(_in_process(main, flags, inputs, capsys), message, inputs)


# ------------------------------------------------------------------------------------ typed YAML, aliases
def test_yaml_is_read_by_field_type(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "lr: 1e-3\nclip: .inf\nsteps: 1e2\nbatch_size: 4.0\nteacher_thinking: yes\nprogress: off\n"
        "eval_benchmarks: [lab]\ntask_options: {levels: [1, 3]}\nexposure-mode: lines\nlearning_rate: 2e-3\n"
    )
    cfg, _ = parse(["--config", str(path)])
    assert cfg.lr == 2e-3 and isinstance(cfg.lr, float) and cfg.clip == float("inf") and cfg.steps == 100
    assert cfg.batch_size == 4 and isinstance(cfg.batch_size, int) and cfg.teacher_thinking and not cfg.progress
    assert cfg.eval_benchmarks == "lab" and cfg.task_options["levels"] == "1,3" and cfg.exposure_mode == "lines"
    assert parse(["--config", str(path), "--lr", "5e-4"])[0].lr == 5e-4  # flags override the file


@pytest.mark.parametrize(
    "text,message",
    [
        ("lr: fast\n", "run.yaml: lr: expected a number, got 'fast'"),
        ("steps: 2.5\n", "run.yaml: steps: expected an integer, got 2.5"),
        ("steps: true\n", "run.yaml: steps: expected an integer, got True"),
        ("model: [a, b]\n", "run.yaml: model: expected a string, not a list"),
        ("top_p: {a: 1}\n", "run.yaml: top_p: expected a number, not a mapping"),
        ("progress: maybe\n", "run.yaml: progress: expected true or false"),
        ("steps: null\nbatch_size: -2\n", "run.yaml: batch_size: must be >= 1, got -2"),
        ("teacher: self\n", "run.yaml: teacher: 'self' is not one of base, current, ema"),
        ("stepz: 3\n", "unknown key stepz (did you mean --steps?)"),
        ("per_device_train_batch_size: 8\n", "per_device_train_batch_size: not an option here"),
        ("42\n", "expected a mapping of option: value, got a int"),
        ("lr: 1e-3\n  steps: 2\n", "not valid YAML at line 2"),
    ],
)
def test_bad_yaml_is_one_line_naming_the_key(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(UsageError) as err:
        parse(["--config", str(path)])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_trl_spellings_are_aliases():
    cfg, _ = parse(
        ["--learning_rate", "0.01", "--max_steps", "3", "--max_new_tokens", "7", "--save_steps", "2",
         "--num_generations", "2", "--output_dir", "runs/x", "--lora_r", "4", "--no-progress"]
    )  # fmt: skip
    assert (cfg.lr, cfg.steps, cfg.max_new_tokens, cfg.save_every, cfg.num_samples) == (0.01, 3, 7, 2, 2)
    assert cfg.output_dir == "runs/x" and cfg.lora_r == 4 and not cfg.progress
    help_text = " ".join(_run("--help").stdout.split())
    assert "--learning_rate = --lr" in help_text and "--max_new_tokens" in help_text
