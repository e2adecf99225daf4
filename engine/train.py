"""On-policy self-distillation with adaptive teacher exposure: ``python -m engine.train --help``.

One optimizer step (``Trainer.step``), top to bottom:
rollout -> exposure -> teacher scoring -> student scoring -> loss -> backward / step -> controller
bookkeeping.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from collections import Counter

import numpy as np
import torch
import yaml

from atesd import controller
from atesd.engine import checkpoint
from atesd.engine.checkpoint import latest_checkpoint
from atesd.engine.config import Config, parse
from atesd.engine.data import DataStream, clean_rows, load_rows
from atesd.engine.evaluator import Evaluator
from atesd.engine.exposure import DEFAULT_INSTRUCTION, Example, make_example
from atesd.engine.loss import distillation_loss, token_logprobs
from atesd.engine.models import Teacher, adapter_params, add_lora, lm_head_weight, load_model
from atesd.engine.packing import Segment, pack
from atesd.engine.rollout import build_rollout
from atesd.engine.scoring import _gather, hidden_states, score_student, score_teacher

log = logging.getLogger("engine")
TIMING_KEYS = ("tokens_per_s", "step_time_s")


def _device(cfg: Config) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _dtype(cfg: Config, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]


def _mean(total: float, count: int) -> float:
    return total / count if count else 0.0


class Trainer:
    def __init__(self, cfg: Config, run_dir: str) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        os.makedirs(run_dir, exist_ok=True)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        try:
            self.policy = controller.build(cfg.exposure)
        except ValueError as e:
            raise ValueError(f"--exposure {cfg.exposure!r}: {e}") from e
        self.evaluator = Evaluator(cfg, run_dir)
        self.device = _device(cfg)
        self.attention = (
            cfg.attention if cfg.attention != "auto" else ("flex" if self.device.type == "cuda" else "dense")
        )
        base, self.tokenizer = load_model(cfg.model, dtype=_dtype(cfg, self.device), device=str(self.device))
        if cfg.gradient_checkpointing == "on" or (
            cfg.gradient_checkpointing == "auto" and self.device.type == "cuda"
        ):
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = add_lora(base, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        self.teacher = Teacher(self.model, cfg.teacher, cfg.ema_decay)
        self.rollout = build_rollout(cfg.rollout, self.model, self.device)
        self.params = list(adapter_params(self.model).values())
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.eos_ids = {self.tokenizer.eos_token_id} | (
            {self.model.config.eos_token_id} if isinstance(self.model.config.eos_token_id, int) else set()
        )

        rows, self.skipped = clean_rows(
            load_rows(
                cfg.data,
                split=cfg.split,
                problem_column=cfg.problem_column,
                solution_column=cfg.solution_column,
                answer_column=cfg.answer_column,
                lab_size=cfg.lab_size,
                lab_levels=cfg.lab_level_tuple(),
                seed=cfg.seed,
            )
        )
        self.rows, self.examples = rows, {}
        self.stream = DataStream(len(rows), cfg.seed)
        self.probe = self._probe_set()
        self.step_no = 0

    # ------------------------------------------------------------------------------------------------- data
    def _lr_factor(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.lr_schedule == "cosine":
            progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    def example(self, i: int) -> Example | None:
        """Tokenized row i, or None (counted) when it is over-long or malformed."""
        if i not in self.examples:
            r, cfg = self.rows[i], self.cfg
            try:
                ex = make_example(
                    self.tokenizer,
                    r["problem"],
                    r["solution"],
                    r["answer"],
                    instruction=cfg.instruction or DEFAULT_INSTRUCTION,
                    teacher_thinking=cfg.teacher_thinking,
                )
            except ValueError:
                ex, reason = None, "malformed"
            else:
                too_long = (
                    len(ex.student_prompt) > cfg.max_prompt_tokens
                    or len(ex.reasoning_ids) + len(ex.answer_ids) > cfg.max_reference_tokens
                )
                reason = "too_long" if too_long else None
                ex = None if too_long else ex
            if reason:
                self.skipped[reason] += 1
                log.info("skipped row %d (%s)", i, reason)
            self.examples[i] = ex
        return self.examples[i]

    def next_batch(self) -> list[Example]:
        batch: list[Example] = []
        for _ in range(100 * self.cfg.batch_size):
            ex = self.example(self.stream.next())
            if ex is not None:
                batch.append(ex)
                if len(batch) == self.cfg.batch_size:
                    return batch
        raise RuntimeError(
            "could not fill a batch: nearly every row is skipped (see the skip counts in run.log)"
        )

    def _probe_set(self) -> list[Example]:
        order = np.random.default_rng([self.cfg.seed, 7919]).permutation(len(self.rows))
        probe = []
        for i in order[: 4 * self.cfg.probe_size]:
            ex = self.example(int(i))
            if ex is not None and len(probe) < self.cfg.probe_size:
                probe.append(ex)
        return probe

    # ------------------------------------------------------------------------------------------------- step
    def step(self) -> dict:
        cfg, model = self.cfg, self.model
        self.step_no += 1
        t0 = time.perf_counter()
        examples = self.next_batch()

        # 1. rollout: the current student samples G continuations of each problem-only prompt
        model.eval()
        generator = torch.Generator(self.device).manual_seed(cfg.seed * 1_000_003 + self.step_no)
        rollouts = self.rollout.sample(
            [ex.student_prompt for ex in examples],
            num_samples=cfg.num_samples,
            max_new_tokens=cfg.max_new_tokens,
            eos_ids=self.eos_ids,
            pad_id=self.tokenizer.pad_token_id,
            temperature=cfg.rollout_temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            generator=generator,
        )
        n_tokens = sum(len(r) for group in rollouts for r in group)

        # 2. exposure: one alpha for the step; k reasoning tokens revealed per problem
        alpha = float(self.policy.exposure())
        ks = [ex.revealed(alpha, cfg.exposure_mode) for ex in examples]

        weight = lm_head_weight(model)
        sums = Counter()
        self.optimizer.zero_grad(set_to_none=True)
        for lo in range(0, len(examples), cfg.micro_batch):
            mb = slice(lo, lo + cfg.micro_batch)
            # 3. teacher scoring (no grad): rollout positions + the credit branch, one packed tree pass
            with self.teacher.view():
                ht, hc, tc = score_teacher(model, examples[mb], ks[mb], rollouts[mb], self.attention)
                credit = token_logprobs(hc, weight.detach(), tc)
            # 4. student scoring (grad) over [prompt ; rollouts]
            model.train()
            hs, _ = score_student(model, examples[mb], rollouts[mb], self.attention)
            model.eval()
            # 5. loss: summed over the micro-batch's rollout tokens, normalised by the step's token count
            loss_sum, stats = distillation_loss(
                hs, ht, weight, temperature=cfg.kl_temperature, clip=cfg.clip, beta=cfg.beta, reduction="sum"
            )
            (loss_sum / n_tokens).backward()
            sums["loss"] += loss_sum.item()
            for name, v in stats.items():
                sums[name] += v.sum().item()
            sums["credit"] += credit.sum().item()
            sums["credit_tokens"] += credit.numel()

        # 6. optimizer step, unless the loss or the gradient is not finite
        loss = sums["loss"] / n_tokens
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
            log.warning(
                "step %d: non-finite loss %s / grad norm %s; step skipped, weights untouched",
                self.step_no,
                loss,
                grad_norm,
            )
        else:
            self.optimizer.step()
            self.scheduler.step()
            if self.teacher.kind == "ema":
                self.teacher.update()

        # 7. controller bookkeeping
        stats = {
            "loss": loss,
            "mismatch": sums["kl"] / n_tokens,
            "confidence": sums["student_max_prob"] / n_tokens,
            "credit": _mean(sums["credit"], sums["credit_tokens"]),
            "progress": self.step_no / cfg.steps,
        }
        if cfg.probe_every and self.step_no % cfg.probe_every == 0 and self.probe:
            stats["probe_nll"] = self.probe_nll()
        if not skipped:
            self.policy.observe(stats)

        dt = time.perf_counter() - t0
        metrics = {
            "step": self.step_no,
            "alpha": alpha,
            **stats,
            "kl": stats["mismatch"],
            "clipped_kl": sums["clipped_kl"] / n_tokens,
            "top1_agree": sums["top1_agree"] / n_tokens,
            "entropy": sums["student_entropy"] / n_tokens,
            "grad_norm": grad_norm,
            "lr": self.scheduler.get_last_lr()[0],
            "rollout_tokens": n_tokens,
            "revealed_frac": _mean(sum(ks), sum(len(ex.reasoning_ids) for ex in examples)),
            "skipped_step": int(skipped),
            "tokens_per_s": n_tokens / dt,
            "step_time_s": dt,
        }
        metrics.update({f"controller/{k}": float(v) for k, v in self.policy.metrics().items()})
        return metrics

    @torch.no_grad()
    def probe_nll(self) -> float:
        """Student NLL (per token) of the probe set's reference solutions given the student prompt."""
        trees = [
            [Segment(ex.student_prompt), Segment(ex.reasoning_ids + ex.answer_ids, 0)] for ex in self.probe
        ]
        packed = pack(trees)
        h, tgt = _gather(hidden_states(self.model, packed, self.attention), packed, trees, lambda t: [1])
        return -token_logprobs(h, lm_head_weight(self.model), tgt).mean().item()

    # ------------------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        """Everything but the adapter weights that an exact resume needs (trainer_state.pt)."""
        return {
            "step": self.step_no,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "controller": self.policy.state_dict(),
            "teacher": self.teacher.state_dict(),
            "data": self.stream.state_dict(),
            "skipped": dict(self.skipped),
            "eval_history": self.evaluator.history,
            "rng": checkpoint.rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step_no = state["step"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.policy.load_state_dict(state["controller"])
        self.teacher.load_state_dict(state["teacher"])
        self.stream.load_state_dict(state["data"])
        self.skipped = Counter(state["skipped"])
        self.evaluator.history = state.get("eval_history", {})
        checkpoint.set_rng_state(state["rng"])

    def save(self) -> str:
        """checkpoints/step-XXXXXX under the run directory, written atomically (engine/checkpoint.py)."""
        return checkpoint.save(self.run_dir, self.step_no, self.model, self.state_dict())

    def load(self, path: str) -> None:
        checkpoint.load_adapter(self.model, path)
        self.load_state_dict(checkpoint.load_state(path))


def train(cfg: Config, resume: str | None = None) -> str:
    """Run (or continue) a training run; returns the run directory."""
    if resume == "auto" and not cfg.output_dir:
        raise FileNotFoundError("bare --resume needs --output-dir (or pass the run directory to --resume)")
    if resume and resume != "auto":
        run_dir = (
            resume
            if os.path.isdir(os.path.join(resume, "checkpoints"))
            else os.path.dirname(os.path.dirname(os.path.abspath(resume)))
        )
    elif cfg.output_dir:
        run_dir = cfg.output_dir
    else:
        run_dir = os.path.join(
            "runs", f"{os.path.basename(cfg.model.rstrip('/'))}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
    os.makedirs(run_dir, exist_ok=True)
    handler = logging.FileHandler(os.path.join(run_dir, "run.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        return _train(cfg, resume, run_dir)
    finally:
        log.removeHandler(handler)
        handler.close()


def _train(cfg: Config, resume: str | None, run_dir: str) -> str:
    with open(os.path.join(run_dir, "config.yaml"), "w") as fh:
        yaml.safe_dump(dataclasses.asdict(cfg), fh, sort_keys=False)
    trainer = Trainer(cfg, run_dir)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if resume:
        ckpt = latest_checkpoint(run_dir if resume == "auto" else resume)
        trainer.load(ckpt)
        log.info("resumed from %s at step %d", ckpt, trainer.step_no)
        if os.path.exists(metrics_path):  # drop lines the interrupted run wrote after its last checkpoint
            with open(metrics_path) as fh:
                kept = [ln for ln in fh if json.loads(ln).get("step", 0) <= trainer.step_no]
            with open(metrics_path, "w") as fh:
                fh.writelines(kept)
        trainer.evaluator.write()  # drop evaluations the interrupted run made after its last checkpoint
    else:
        open(metrics_path, "w").close()
        for stale in ("summary.json", "eval_summary.json"):
            if os.path.exists(os.path.join(run_dir, stale)):
                os.remove(os.path.join(run_dir, stale))
        if trainer.evaluator.due(0):
            trainer.evaluator.run(trainer.model, trainer.tokenizer, 0)
    log.info(
        "run %s: model %s, data %s (%d rows; skipped %s), exposure %s",
        run_dir,
        cfg.model,
        cfg.data,
        len(trainer.rows),
        dict(trainer.skipped),
        cfg.exposure,
    )

    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    writer = SummaryWriter(os.path.join(run_dir, "tb"))
    bar = tqdm(
        total=cfg.steps, initial=trainer.step_no, disable=not cfg.progress, desc="train", file=sys.stderr
    )
    last = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
    with open(metrics_path, "a") as out:
        while trainer.step_no < last:
            m = trainer.step()
            # evaluated before the save, so the checkpoint's state holds this step's evaluation too
            evaluated = trainer.evaluator.due(m["step"])
            if evaluated:
                m.update(trainer.evaluator.run(trainer.model, trainer.tokenizer, m["step"]))
            out.write(json.dumps(m) + "\n")
            out.flush()
            for k, v in m.items():
                if k != "step":
                    writer.add_scalar(k, v, m["step"])
            bar.update(1)
            bar.set_postfix(
                loss=f"{m['loss']:.4f}", alpha=f"{m['alpha']:.2f}", tok_s=f"{m['tokens_per_s']:.0f}"
            )
            if evaluated or m["step"] % cfg.save_every == 0 or m["step"] == cfg.steps:
                trainer.save()
    bar.close()
    if trainer.step_no >= cfg.steps:
        if hasattr(trainer.policy, "finish"):
            trainer.policy.finish()
        log.info("finished %d steps; skipped rows %s", trainer.step_no, dict(trainer.skipped))
        ev = trainer.evaluator
        if ev.due(cfg.steps) and not ev.done(cfg.steps):  # resumed after the last save, before its evaluation
            for k, v in ev.run(trainer.model, trainer.tokenizer, cfg.steps).items():
                writer.add_scalar(k, v, cfg.steps)
        for name in ev.history:
            b = ev.best(name)
            where = os.path.join(run_dir, b["checkpoint"]) if b["checkpoint"] else "the base model"
            print(f"best {name} accuracy: {b['accuracy']:.3f} at step {b['step']} ({where})", flush=True)
        with open(os.path.join(run_dir, "summary.json"), "w") as fh:
            json.dump(run_summary(run_dir, cfg, ev), fh, indent=1)
    writer.close()
    return run_dir


def run_summary(run_dir: str, cfg: Config, evaluator: Evaluator) -> dict:
    """Headline numbers of a finished run (summary.json): accuracy before/after (lab, else the first
    benchmark), token-weighted mean KL and top-1 agreement over the run's non-skipped steps, mean alpha."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(ln) for ln in fh if ln.strip()]
    ok = [r for r in rows if not r.get("skipped_step") and math.isfinite(r["loss"])]
    tokens = sum(r["rollout_tokens"] for r in ok)

    def weighted(key: str) -> float | None:
        return sum(r[key] * r["rollout_tokens"] for r in ok) / tokens if tokens else None

    evals = {}
    for name, hist in evaluator.history.items():
        by_step = {e["step"]: e["accuracy"] for e in hist}
        evals[name] = {
            "before": by_step.get(0),
            "after": by_step.get(cfg.steps),
            "best": evaluator.best(name),
        }
    head = evals.get("lab") or next(iter(evals.values()), {})
    before, after = head.get("before"), head.get("after")
    top1 = weighted("top1_agree")
    return {
        "run_dir": run_dir,
        "model": cfg.model,
        "data": cfg.data,
        "exposure": cfg.exposure,
        "seed": cfg.seed,
        "steps": cfg.steps,
        "accuracy_before": before,
        "accuracy_after": after,
        "gain": after - before if before is not None and after is not None else None,
        "kl_mean": weighted("kl"),
        "top1_agree_mean": top1,
        "top1_disagree_mean": None if top1 is None else 1.0 - top1,
        "alpha_mean": sum(r["alpha"] for r in ok) / len(ok) if ok else None,
        "loss_mean": weighted("loss"),
        "skipped_steps": len(rows) - len(ok),
        "eval": evals,
    }


def main(argv: list[str] | None = None) -> dict:
    """CLI entry point; returns the run's summary.json content (``{"run_dir", "finished": False}`` if stopped
    early by --stop-after)."""
    cfg, resume = parse(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from atesd.engine.models import ModelLoadError

    try:
        run_dir = train(cfg, resume)
    except (ModelLoadError, FileNotFoundError, ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"run directory: {run_dir}")
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        return {"run_dir": run_dir, "finished": False}
    with open(path) as fh:
        return json.load(fh)


def cli() -> None:
    """Console-script entry point (``atesd-train``): :func:`main` without its return value."""
    main()


if __name__ == "__main__":
    main()
