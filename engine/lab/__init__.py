"""The embedded default's lab: the synthetic bags task, prompts, tokenizer and the shipped tiny Qwen3.

It plugs into the engine as the task named ``lab`` (``engine/lab/recipe.py``), the way a user's task would.
"""

from pathlib import Path

from atesd.engine.lab.task import generate_problems, lab_dataset, verify

TINY_MODEL_DIR = str(Path(__file__).resolve().parent / "assets" / "tiny-qwen3")

__all__ = ["TINY_MODEL_DIR", "generate_problems", "lab_dataset", "verify"]
