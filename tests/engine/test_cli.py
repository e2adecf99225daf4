"""CLI: --help documents every option, presets resolve to recipes, an unloadable model fails fast by name."""

import dataclasses
import os
import subprocess
import sys

import pytest
from engine_tiny import write_dataset

from atesd.engine.config import Config, parse
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
    args = ("--model", "qwen3-8b", "--data", data, "--exposure", "full", "--output-dir", str(run))
    out = _run(*args, env={"HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2 and "qwen3-8b" in out.stderr and "Qwen/Qwen3-8B" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Qwen/Qwen3-8B" in (run / "run.log").read_text()  # the failure is recorded in the run
