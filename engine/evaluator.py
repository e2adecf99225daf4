"""Held-out evaluation during training: before the first step, every ``--eval-every`` steps and after the last."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from atesd.engine import distributed, evaluation
from atesd.engine.checkpoint import checkpoint_name
from atesd.engine.config import Config
from atesd.engine.task import EvalProtocol, Task, get_task, is_task, resolve_templates

log = logging.getLogger("engine")


class Evaluator:
    """Held-out evaluation before training (step 0), every ``eval_every`` steps and after the last step.

    ``history[name]`` lists ``{"step", "accuracy", "n", "n_samples", "per_level", "checkpoint", "seconds"}`` per
    evaluation (``checkpoint`` relative to the run directory, None at step 0: the base model). It travels in
    the trainer state, so it survives ``--resume``; ``eval_summary.json`` mirrors it with the best step.
    """

    def __init__(self, cfg: Config, run_dir: str) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.sets: dict[str, list[dict]] = {}
        self.tasks: dict[str, Task] = {}  # the task whose prompts, verifier and protocol each set uses
        self.history: dict[str, list[dict]] = {}
        self.decoder = None  # the trainer's static-cache rollout engine, when it has one (decodes evaluations)
        names = [b.strip() for b in (cfg.eval_benchmarks or "").split(",") if b.strip()]
        if cfg.eval_every < 0:
            raise ValueError(f"--eval-every must be >= 0, got {cfg.eval_every}")
        if not names:
            return
        run_task = get_task(cfg.task)
        self.templates = resolve_templates(run_task, cfg.prompts)
        for name in names:
            if is_task(name) and not cfg.eval_problems:
                raise ValueError(f"--eval-benchmarks {name} needs --eval-problems > 0")
            # a task with its own problems (lab): its held-out split, its own protocol; else through the run's task
            key, task, problems = evaluation.evaluation_set(
                name, run_task, n_problems=cfg.eval_problems or 0, seed=cfg.seed, task_options=cfg.task_options,
                limit=cfg.eval_limit)
            self.sets[key], self.tasks[key] = problems, task

    def protocol(self, name: str) -> EvalProtocol:
        """The set's task protocol with the run's --eval-* overrides (math: the paper's)."""
        cfg = self.cfg
        return self.tasks[name].eval.replace(
            temperature=cfg.eval_temperature, top_p=cfg.eval_top_p, top_k=cfg.eval_top_k,
            max_new_tokens=cfg.eval_max_new_tokens, n_samples=cfg.eval_samples, thinking=cfg.eval_thinking,
        )

    def due(self, step: int) -> bool:
        cfg = self.cfg
        return bool(self.sets) and (
            step in (0, cfg.steps) or (cfg.eval_every > 0 and step % cfg.eval_every == 0)
        )

    def done(self, step: int) -> bool:
        return all(any(e["step"] == step for e in self.history.get(name, [])) for name in self.sets)

    def templates_of(self, name: str):
        """The evaluation prompt of a set: the run's templates (--prompts) for its --task, else the set's task's."""
        task = self.tasks[name]
        return self.templates if task.name == self.cfg.task else task.templates

    def _one(self, model, tokenizer, name: str, problems: list[dict]) -> dict:
        show = self.cfg.progress and distributed.is_main()
        res = evaluation.evaluate_task(model, tokenizer, problems, self.tasks[name], templates=self.templates_of(name),
                                       seed=self.cfg.seed, decoder=self.decoder, progress=f"eval {name}" if show
                                       else None, **vars(self.protocol(name)))
        res.pop("results", None)
        return res

    def run(self, model, tokenizer, step: int) -> dict[str, float]:
        """Evaluate every benchmark at ``step``; returns ``{"eval/<name>/accuracy": ..}`` for the logs.

        Under torchrun every rank calls it: the problems are sharded over the ranks and the results gathered
        (``evaluation.evaluate_problems``), so every rank holds the same history; rank 0 reports and writes."""
        from tqdm import tqdm

        label = {0: "before training", self.cfg.steps: "after training"}.get(step, f"at step {step}")
        out: dict[str, float] = {}
        for name, problems in self.sets.items():
            t0 = time.perf_counter()
            res = self._one(model, tokenizer, name, problems)
            entry = {
                "step": step,
                "accuracy": float(res["accuracy"]),
                "n": res["n"],
                "n_samples": res["n_samples"],
                "per_level": {str(k): float(v) for k, v in res.get("per_level", {}).items()},
                "checkpoint": checkpoint_name(step) if step else None,
                "seconds": round(time.perf_counter() - t0, 2),
            }
            hist = self.history.setdefault(name, [])
            hist[:] = [e for e in hist if e["step"] != step] + [entry]
            out[f"eval/{name}/accuracy"] = entry["accuracy"]
            for lv, acc in entry["per_level"].items():
                out[f"eval/{name}/level_{lv}"] = acc
            t = self.protocol(name).temperature
            how = f"Average@{res['n_samples']}, T={t:g}" if t > 0 else "greedy"
            what = "held-out accuracy" if is_task(name) else f"{name} accuracy"
            if distributed.is_main():
                tqdm.write(f"{what} {label}: {entry['accuracy']:.3f} (n={res['n']}, {how})", file=sys.stdout)
        sys.stdout.flush()
        self.write()
        return out

    def best(self, name: str) -> dict | None:
        """The trained checkpoint with the highest accuracy (the earliest step on ties), the paper's rule: step 0
        is the base model, reported as the base row (:meth:`base`), never chosen. None before any trained step."""
        trained = [e for e in self.history.get(name, []) if e["step"] > 0]
        if not trained:
            return None
        e = max(trained, key=lambda e: (e["accuracy"], -e["step"]))
        return {"step": e["step"], "accuracy": e["accuracy"], "checkpoint": e["checkpoint"]}

    def base(self, name: str) -> dict | None:
        """The base model's evaluation (step 0), or None when it was not evaluated."""
        e = next((e for e in self.history.get(name, []) if e["step"] == 0), None)
        return None if e is None else {"step": 0, "accuracy": e["accuracy"], "checkpoint": None}

    def summary(self) -> dict:
        return {
            "eval_every": self.cfg.eval_every,
            "benchmarks": {
                name: {"base": self.base(name), "best": self.best(name),
                       "history": sorted(hist, key=lambda e: e["step"])}
                for name, hist in self.history.items()
                if hist
            },
        }

    def write(self) -> None:
        """eval_summary.json in the run directory (temp file + rename; rank 0 only)."""
        if not self.history or not distributed.is_main():
            return
        path = os.path.join(self.run_dir, "eval_summary.json")
        with open(path + ".tmp", "w") as fh:
            json.dump(self.summary(), fh, indent=1)
        os.replace(path + ".tmp", path)
