"""End to end on CPU: 20 steps on a tiny random Qwen3: loss decreases, checkpoints, exact resume, NaN skip."""

import json
import math
import os

import pytest
import torch
import yaml
from engine_tiny import write_dataset

import atesd.engine.train as train_mod
import atesd.engine.trainer as trainer_mod
from atesd.engine import checkpoint
from atesd.engine.invocation import parse
from atesd.engine.train import train
from atesd.engine.trainer import TIMING_METRICS

TIMING = TIMING_METRICS


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "train.jsonl", n=40)


def _args(model_dir, data, out, *extra):
    return [
        "--model",
        model_dir,
        "--data",
        data,
        "--output-dir",
        str(out),
        "--exposure",
        "fixed:0.6",
        "--steps",
        "20",
        "--batch-size",
        "4",
        "--micro-batch",
        "2",
        "--num-samples",
        "2",
        "--max-new-tokens",
        "12",
        "--lr",
        "3e-3",
        "--save-every",
        "5",
        "--probe-every",
        "5",
        "--probe-size",
        "4",
        "--no-progress",
        *extra,
    ]


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in fh]


def test_train_checkpoint_and_exact_resume(tiny_model_dir, data, tmp_path):
    full = train(*parse(_args(tiny_model_dir, data, tmp_path / "full")))
    m_full = _metrics(full)
    assert [m["step"] for m in m_full] == list(range(1, 21))
    losses = [m["loss"] for m in m_full]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses  # distillation loss decreases
    assert all("probe_nll" in m for m in m_full if m["step"] % 5 == 0)
    with open(os.path.join(full, "metrics.jsonl")) as fh:  # the probe NLL's forward pass is timed as a probe
        timed = [m for m in map(json.loads, fh) if "loss" in m]
    assert [m["step"] for m in timed if m["probe_s"] > 0] == [5, 10, 15, 20]
    ckpts = sorted(os.listdir(os.path.join(full, "checkpoints")))
    assert ckpts == [f"step-{s:06d}" for s in (5, 10, 15, 20)]
    for c in ckpts:
        files = set(os.listdir(os.path.join(full, "checkpoints", c)))
        assert {"adapter_model.safetensors", "adapter_config.json", "trainer_state.json",
                "trainer_state.safetensors"} <= files
    assert os.path.exists(os.path.join(full, "config.yaml")) and os.listdir(os.path.join(full, "tb"))
    with open(os.path.join(full, "run.log")) as fh:
        assert "'no_boxed_answer': 1" in fh.read()  # bad rows counted in the run log

    # killed after step 10, then resumed from its run directory
    killed = tmp_path / "killed"
    train(*parse(_args(tiny_model_dir, data, killed, "--stop-after", "10")))
    assert len(_metrics(killed)) == 10
    train(*parse(_args(tiny_model_dir, data, killed, "--resume")))
    m_resumed = _metrics(killed)
    assert [m["step"] for m in m_resumed] == list(range(1, 21))
    assert m_resumed[10:] == m_full[10:]  # steps 11-20 identical, every metric


def test_nonfinite_loss_skips_step(tiny_model_dir, data, tmp_path, monkeypatch):
    real = trainer_mod.distillation_loss
    calls = {"n": 0}

    def flaky(*a, **kw):
        loss, stats = real(*a, **kw)
        calls["n"] += 1
        return (
            (loss * float("nan"), stats) if calls["n"] in (3, 4) else (loss, stats)
        )  # both micro-batches of step 2

    monkeypatch.setattr(trainer_mod, "distillation_loss", flaky)
    cfg, _ = parse(_args(tiny_model_dir, data, tmp_path / "nan", "--steps", "3", "--probe-every", "0"))
    trainer = train_mod.Trainer(cfg, str(tmp_path / "nan"))
    trainer.step()
    before = [p.detach().clone() for p in trainer.params]
    m = trainer.step()
    assert m["skipped_step"] == 1 and not m["loss"] == m["loss"]
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params))
    assert trainer.step()["skipped_step"] == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.params))


@pytest.mark.parametrize("teacher", ["current", "ema"])
def test_teacher_kinds_and_yaml(tiny_model_dir, data, tmp_path, teacher):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"teacher: {teacher}\nexposure_mode: lines\nsteps: 7\n")
    cfg, _ = parse(_args(tiny_model_dir, data, tmp_path / teacher, "--config", str(cfg_file), "--steps", "2"))
    assert cfg.teacher == teacher and cfg.exposure_mode == "lines" and cfg.steps == 2  # flags override YAML
    m = _metrics(train(cfg))
    assert len(m) == 2 and all(x["loss"] == x["loss"] for x in m)
    if (
        teacher == "current"
    ):  # same weights on both sides at step 1 (adapter B = 0): the teacher only adds context
        assert m[0]["kl"] > 0


def test_controller_wiring(tiny_model_dir, data, tmp_path, monkeypatch):
    from atesd.controller import FixedExposure

    class Recorder(FixedExposure):
        def __init__(self):
            super().__init__(0.3)
            self.calls, self.finished = [], False

        def exposure(self):
            self.calls.append("exposure")
            return super().exposure()

        def observe(self, stats):
            self.calls.append(dict(stats))

        def finish(self):
            self.finished = True

        def wants(self, key):  # a probe NLL after the third step's update, besides every --probe-every steps
            return key == "probe_nll" and self.calls.count("exposure") == 3

    policy = Recorder()
    policy.uses_credit = True  # the engine computes the teacher-grounded credit only for a policy using it
    built = {}
    monkeypatch.setattr(trainer_mod.controller, "build", lambda spec, **kw: built.update(kw) or policy)
    train(*parse(_args(tiny_model_dir, data, tmp_path / "ctl", "--steps", "4", "--probe-every", "2")))
    assert policy.calls[::2] == ["exposure"] * 4 and policy.finished
    observed = policy.calls[1::2]
    assert all({"loss", "mismatch", "confidence", "credit", "progress"} <= set(s) for s in observed)
    assert [("probe_nll" in s) for s in observed] == [False, True, True, True]
    assert [s["progress"] for s in observed] == [0.25, 0.5, 0.75, 1.0]
    assert all(s["credit"] < 0 and 0 < s["confidence"] <= 1 and s["mismatch"] >= 0 for s in observed)
    assert built["seed"] == 0 and built["strict"] is False and built["total_steps"] == 4  # seed, budget, settings
    assert built["hold"] is None and built["preset"] is None  # unset: the preset's, sized from total_steps


CONTROLLER_FLAGS = ["--controller-hold", "2", "--controller-lookahead", "3", "--controller-lr", "0.5",
                    "--controller-lambda-gt", "0.2", "--controller-entropy-coef", "0.02"]
CONTROLLER_SET = {"hold": 2, "lookahead": 3, "lr": 0.5, "lambda_gt": 0.2, "entropy_coef": 0.02}


def test_controller_settings_roundtrip_yaml_flags_config_and_resume(tiny_model_dir, data, tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("controller_hold: 5\ncontroller_gamma: 0.8\ncontroller_optimizer: adam\n")
    cfg, _ = parse(["--config", str(cfg_file), "--controller-hold", "3"])
    assert cfg.controller_settings()["hold"] == 3 and cfg.controller_settings()["gamma"] == 0.8  # flag > YAML
    assert cfg.controller_settings()["optimizer"] == "adam"

    def run(out, *extra):
        args = _args(tiny_model_dir, data, out, "--exposure", "adaptive", "--steps", "10", "--save-every", "5",
                     "--probe-every", "2", *CONTROLLER_FLAGS, *extra)
        return train(*parse(args))

    full = run(tmp_path / "full")
    with open(os.path.join(full, "config.yaml")) as fh:
        saved = yaml.safe_load(fh)
    assert {k: saved["controller_" + k] for k in CONTROLLER_SET} == CONTROLLER_SET  # recorded in config.yaml
    again, _ = parse(["--config", os.path.join(full, "config.yaml")])  # and reusable as a --config
    assert {k: again.controller_settings()[k] for k in CONTROLLER_SET} == CONTROLLER_SET
    m_full = _metrics(full)
    assert m_full[-1]["controller/updates"] >= 2 and all("credit" in m for m in m_full)  # it learns, with credit

    killed = run(tmp_path / "killed", "--stop-after", "5")
    run(tmp_path / "killed", "--resume")
    assert _metrics(killed) == m_full  # exact: alphas, rewards, policy updates
    state = checkpoint.read_state(os.path.join(killed, "checkpoints", "step-000010"))
    assert {k: state["controller"]["config"][k] for k in CONTROLLER_SET} == CONTROLLER_SET
    with pytest.raises(ValueError, match="hold"):  # resuming with other settings is refused, by name
        run(tmp_path / "killed", "--resume", "--controller-hold", "3")


@pytest.mark.parametrize("exposure", ["random", "adaptive"])
def test_seed_seeds_the_exposure_policy(tiny_model_dir, data, tmp_path, exposure):
    def alphas(seed):
        cfg, _ = parse(_args(tiny_model_dir, data, tmp_path / f"s{seed}", "--exposure", exposure, "--seed", str(seed)))
        policy = train_mod.Trainer(cfg, str(tmp_path / f"s{seed}")).policy
        out = []
        for t in range(24):
            out.append(policy.exposure())
            policy.observe({"loss": 1.0 - 0.01 * t, "mismatch": 0.1, "confidence": 0.5, "credit": -1.0,
                            "progress": t / 24})
        return out

    a0, a0_again, a1 = alphas(0), alphas(0), alphas(1)
    assert a0 == a0_again and a0 != a1


def test_the_adapter_starts_from_the_seed_whatever_the_exposure_policy(tiny_model_dir, data, tmp_path):
    """Same --seed, same initial LoRA weights for every --exposure (paired comparisons pair the same start).
    Regression: the adaptive controller's construction drew from torch's global generator before add_lora."""
    def lora_init(exposure):
        cfg, _ = parse(_args(tiny_model_dir, data, tmp_path / exposure.replace(":", "_"), "--exposure", exposure))
        model = train_mod.Trainer(cfg, str(tmp_path / exposure.replace(":", "_"))).model
        return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}

    fixed, adaptive, random_ = lora_init("fixed:0.5"), lora_init("adaptive"), lora_init("random")
    assert fixed and fixed.keys() == adaptive.keys() == random_.keys()
    assert all(torch.equal(fixed[k], adaptive[k]) and torch.equal(fixed[k], random_[k]) for k in fixed)


def test_accuracy_signal_measures_at_decision_starts_and_resumes_exactly(tiny_model_dir, data, tmp_path):
    def run(out, *extra):
        args = _args(tiny_model_dir, data, out, "--exposure", "adaptive", "--steps", "8", "--save-every", "4",
                     "--controller-signal", "accuracy", "--controller-hold", "2", "--controller-lookahead", "3",
                     "--probe-accuracy-size", "3", "--probe-every", "0", *extra)
        return train(*parse(args))

    full_dir = run(tmp_path / "full")
    full = _metrics(full_dir)
    measured = [m["step"] for m in full if "probe_accuracy" in m]
    assert measured == [1, 3, 5, 7]  # the first step of every 2-step decision, before its update
    with open(os.path.join(full_dir, "metrics.jsonl")) as fh:  # the probe's decode time, where it ran
        logged = [m for m in map(json.loads, fh) if "loss" in m]
    probe_s = {m["step"]: m["probe_s"] for m in logged}
    assert [s for s, v in probe_s.items() if v > 0] == measured and len(probe_s) == 8
    for m in logged:  # the throughput is the training work's: the probe's decode is not in it
        assert m["tokens_per_s"] == pytest.approx(m["rollout_tokens"] / (m["step_time_s"] - m["probe_s"]))
    assert all(m["probe_accuracy"] in (0.0, 1 / 3, 2 / 3, 1.0) for m in full if "probe_accuracy" in m)
    assert full[-1]["controller/scored"] >= 2 and full[-1]["controller/updates"] >= 1
    killed = run(tmp_path / "killed", "--stop-after", "4")
    run(tmp_path / "killed", "--resume")
    assert _metrics(killed) == full


@pytest.mark.parametrize("extra", [["--controller-signal", "probe_nll", "--controller-hold", "4",
                                    "--controller-lookahead", "6", "--probe-every", "0"],
                                   ["--controller-preset", "paper", "--controller-update-batch", "2"]])
def test_probe_nll_signal_and_paper_preset_run_and_resume_exactly(tiny_model_dir, data, tmp_path, extra):
    def run(out, *more):
        args = _args(tiny_model_dir, data, out, "--exposure", "adaptive", "--steps", "8", "--save-every", "4",
                     *extra, *more)
        return train(*parse(args))

    full = _metrics(run(tmp_path / "full"))
    state = checkpoint.read_state(os.path.join(tmp_path / "full", "checkpoints", "step-000008"))["controller"]
    if "probe_nll" in extra:  # asked after every update (K = 4: stride 1): the engine measured each step
        assert all("probe_nll" in m for m in full) and state["config"]["signal"] == "probe_nll"
        assert full[-1]["controller/scored"] >= 1
    else:  # --steps 8 sizes nothing under the paper preset: K = 4, L = 12
        c = state["config"]
        assert c["preset"] == "paper" and (c["hold"], c["lookahead"], c["update"]) == (4, 12, "reinforce")
    killed = run(tmp_path / "killed", "--stop-after", "4")
    run(tmp_path / "killed", "--resume", "--steps", "8")
    assert _metrics(killed) == full


@pytest.mark.parametrize("rows_mib", ["0", "0.05"])
def test_the_gpu_op_paths_train_as_the_cpu_kernel_does(tiny_model_dir, data, tmp_path, monkeypatch, rows_mib):
    """engine.train with the loss on the Triton backend (the tile path, then the rows path in blocks of 64 rows with
    its frozen-head gradient formed in the forward), run here through Triton's interpreter on CPU tensors: the same
    first step as the CPU kernel (same rollouts, loss and gradient norm), and a run that trains."""
    if os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available():
        pytest.skip("the interpreter on CPU tensors (a GPU runs these paths in the kernel tests)")
    from atesd.kernels import _ops

    base = _metrics(train(*parse(_args(tiny_model_dir, data, tmp_path / "cpu", "--steps", "3"))))
    monkeypatch.setattr(_ops, "backend_for", lambda device: "triton")
    monkeypatch.setenv("ATESD_TRITON_ROWS_MIB", rows_mib)
    run = train(*parse(_args(tiny_model_dir, data, tmp_path / "gpu-path", "--steps", "3")))
    got = _metrics(run)
    assert [m["step"] for m in got] == [1, 2, 3] and all(math.isfinite(m["loss"]) for m in got)
    for key in ("loss", "grad_norm"):
        assert got[0][key] == pytest.approx(base[0][key], rel=1e-4), key
    with open(os.path.join(run, "run.log")) as fh:
        assert ("rows path" in fh.read()) == (rows_mib != "0")  # describe_backend names the path that ran
