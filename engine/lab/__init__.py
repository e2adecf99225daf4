"""The embedded default's lab: synthetic arithmetic task, prompts, tokenizer and the shipped tiny Qwen3."""

from pathlib import Path

from atesd.engine.lab.task import generate_problems, lab_dataset, verify

TINY_MODEL_DIR = str(Path(__file__).resolve().parent / "assets" / "tiny-qwen3")

__all__ = ["TINY_MODEL_DIR", "generate_problems", "lab_dataset", "verify"]
