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
import shutil
import sys
import time
from collections import Counter

import numpy as np
import torch
import yaml

import controller

from .config import Config, parse
from .data import DataStream, clean_rows, load_rows
from .exposure import DEFAULT_INSTRUCTION, Example, make_example
from .loss import distillation_loss, token_logprobs
from .models import Teacher, adapter_params, add_lora, lm_head_weight, load_model
from .packing import Segment, pack
from .rollout import sample
from .scoring import _gather, hidden_states, score_student, score_teacher

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
        rollouts = sample(
            model,
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
    def save(self) -> str:
        """Atomically write checkpoints/step-XXXXXX: peft adapter + trainer_state.pt (temp dir + rename)."""
        root = os.path.join(self.run_dir, "checkpoints")
        os.makedirs(root, exist_ok=True)
        final = os.path.join(root, f"step-{self.step_no:06d}")
        tmp = os.path.join(root, f".tmp-step-{self.step_no:06d}")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        state = {
            "step": self.step_no,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "controller": self.policy.state_dict(),
            "teacher": self.teacher.state_dict(),
            "data": self.stream.state_dict(),
            "skipped": dict(self.skipped),
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }
        torch.save(state, os.path.join(tmp, "trainer_state.pt"))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        return final

    def load(self, path: str) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        adapter = load_file(os.path.join(path, "adapter_model.safetensors"))
        set_peft_model_state_dict(self.model, adapter)
        state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
        self.step_no = state["step"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.policy.load_state_dict(state["controller"])
        self.teacher.load_state_dict(state["teacher"])
        self.stream.load_state_dict(state["data"])
        self.skipped = Counter(state["skipped"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def latest_checkpoint(path: str) -> str:
    """``path`` itself if it is a checkpoint, else the newest checkpoints/step-* under the run directory."""
    if os.path.exists(os.path.join(path, "trainer_state.pt")):
        return path
    root = os.path.join(path, "checkpoints")
    steps = sorted(d for d in os.listdir(root) if d.startswith("step-")) if os.path.isdir(root) else []
    if not steps:
        raise FileNotFoundError(f"no checkpoint to resume under {path!r}")
    return os.path.join(root, steps[-1])


def _evaluate(trainer: Trainer, label: str) -> dict | None:
    cfg = trainer.cfg
    if cfg.data != "lab" or not cfg.eval_problems:
        return None
    try:
        from engine.evaluate import evaluate_lab
        from engine.lab import lab_dataset
    except ImportError:
        log.warning("held-out evaluation skipped: engine.evaluate / engine.lab not available")
        return None
    problems = lab_dataset("test", cfg.eval_problems, cfg.seed)
    trainer.model.eval()
    result = evaluate_lab(
        trainer.model,
        trainer.tokenizer,
        problems,
        max_new_tokens=cfg.eval_max_new_tokens,
        temperature=0.0,
        seed=cfg.seed,
    )
    print(
        f"held-out accuracy {label} training: {result['accuracy']:.3f} (n={result['n']}, greedy)", flush=True
    )
    return result


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
    else:
        open(metrics_path, "w").close()
        _evaluate(trainer, "before")
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
            out.write(json.dumps(m) + "\n")
            out.flush()
            for k, v in m.items():
                if k != "step":
                    writer.add_scalar(k, v, m["step"])
            bar.update(1)
            bar.set_postfix(
                loss=f"{m['loss']:.4f}", alpha=f"{m['alpha']:.2f}", tok_s=f"{m['tokens_per_s']:.0f}"
            )
            if m["step"] % cfg.save_every == 0 or m["step"] == cfg.steps:
                trainer.save()
    bar.close()
    writer.close()
    if trainer.step_no >= cfg.steps:
        if hasattr(trainer.policy, "finish"):
            trainer.policy.finish()
        log.info("finished %d steps; skipped rows %s", trainer.step_no, dict(trainer.skipped))
        _evaluate(trainer, "after")
    return run_dir


def main(argv: list[str] | None = None) -> None:
    cfg, resume = parse(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from .models import ModelLoadError

    try:
        run_dir = train(cfg, resume)
    except (ModelLoadError, FileNotFoundError, ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"run directory: {run_dir}")


if __name__ == "__main__":
    main()
