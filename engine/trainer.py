"""The trainer: one optimizer step of on-policy self-distillation with adaptive teacher exposure, and its state.

:meth:`Trainer.step`, top to bottom (each phase a method below it)::

    batch       next_batch            the step's problems, the same on every rank
    0. measure  measure_before        what the exposure policy asks to see before the update (probe accuracy)
    1. rollout  sample_rollouts       the student samples G continuations of each problem-only prompt
    2. exposure (in step)             one alpha from the policy; each reference cut at alpha
    3-5. score  score_and_backward    teacher (no grad) and student over packed prefix-sharing trees, the fused
                                      clipped KL, backward, micro-batch by micro-batch
    6. update   optimizer_step        clip-grad-norm, AdamW, scheduler, EMA teacher; skipped when not finite
    7. observe  observe               the policy's statistics (loss, mismatch, confidence, credit, probe NLL)

The state an exact resume needs (``state_dict`` / ``load_state_dict``, ``save`` / ``restore``) is the last part.
Everything around the steps (the run directory, metrics, evaluations, checkpoints' schedule, signals) is
``engine/run.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from collections import Counter

import numpy as np
import torch

from atesd import controller
from atesd.engine import checkpoint, distributed
from atesd.engine.config import Config
from atesd.engine.data import DataStream, clean_rows, load_rows
from atesd.engine.errors import DataError, UsageError
from atesd.engine.evaluator import Evaluator
from atesd.engine.exposure import Example, make_example, use_chat_template
from atesd.engine.loss import describe_loss_backend, distillation_loss, token_logprobs
from atesd.engine.models import Teacher, adapter_params, add_lora, load_model, load_tokenizer
from atesd.engine.probes import probe_accuracy, probe_nll, probe_set
from atesd.engine.rollout import build_rollout
from atesd.engine.sampling import problem_seeds
from atesd.engine.scoring import score_student, score_teacher
from atesd.engine.task import get_task, resolve_templates

log = logging.getLogger("engine")
# the wall-clock metrics of a step: all that differs between two runs of the same seeds (exact-resume checks skip them)
TIMING_METRICS = ("tokens_per_s", "step_time_s", "probe_s")


def _dtype(cfg: Config, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]


def _mean(total: float, count: int) -> float:
    return total / count if count else 0.0


def state_location() -> str | None:
    """Where a checkpoint's tensors load: the CPU under torchrun (whole tensors, sharded afterwards)."""
    return "cpu" if distributed.world_size() > 1 else None


class Trainer:
    def __init__(self, cfg: Config, run_dir: str) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        os.makedirs(run_dir, exist_ok=True)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        try:  # every controller setting goes to the policy that takes it; --seed seeds every policy, --steps sizes it
            self.policy = controller.build(
                cfg.exposure, seed=cfg.seed, strict=False, total_steps=cfg.steps, **cfg.controller_settings()
            )
        except ValueError as e:
            raise UsageError(f"--exposure {cfg.exposure!r}: {e}") from e
        self.task = get_task(cfg.task)
        self.templates = resolve_templates(
            self.task, cfg.prompts, instruction=cfg.instruction, teacher_thinking=cfg.teacher_thinking
        )
        try:  # every input is read before the model loads (minutes for an 8B model)
            self.evaluator = Evaluator(cfg, run_dir)
        except (RuntimeError, ValueError) as e:
            raise DataError(f"--eval-benchmarks {cfg.eval_benchmarks!r}: {e}") from e
        rows, self.skipped = training_rows(cfg)
        self.device = distributed.device_of(cfg.device)
        log.info("loss backend: %s", describe_loss_backend(self.device))
        self.attention = (
            cfg.attention if cfg.attention != "auto" else ("flex" if self.device.type == "cuda" else "dense")
        )
        # the chat template every prompt (training and evaluation) is rendered with, decided before the weights load
        self.tokenizer = load_tokenizer(cfg.model)
        use_chat_template(self.tokenizer, cfg.chat_template, owner=f"the tokenizer of model {cfg.model!r}")
        base, _ = load_model(cfg.model, dtype=_dtype(cfg, self.device), device=str(self.device),
                             tokenizer=self.tokenizer)
        if cfg.gradient_checkpointing == "on" or (
            cfg.gradient_checkpointing == "auto" and self.device.type == "cuda"
        ):
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # The adapter's initialisation (LoRA A) comes from --seed alone, not from what was drawn from the global
        # generator before it (the adaptive policy's construction did until 2026-12-05; a model loader might).
        torch.manual_seed(cfg.seed)
        self.model = add_lora(base, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        # data parallel over the ranks (FSDP2 or replicated); nothing at all with one process
        self.parallel = distributed.DataParallel(self.model, cfg.fsdp, self.device)
        if distributed.rank() > 0:  # LoRA dropout masks: a stream of its own per rank
            torch.manual_seed(cfg.seed * 1_000_003 + distributed.rank())
        self.teacher = Teacher(self.model, cfg.teacher, cfg.ema_decay)
        self.rollout = build_rollout(cfg.rollout, self.model, self.device)
        if hasattr(self.rollout, "generate"):  # the static-cache decoder also decodes the evaluations
            self.evaluator.decoder = self.rollout
        self.params = list(adapter_params(self.model).values())
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.eos_ids = {self.tokenizer.eos_token_id} | (
            {self.model.config.eos_token_id} if isinstance(self.model.config.eos_token_id, int) else set()
        )
        self.rows, self.examples = rows, {}
        self.stream = DataStream(len(rows), cfg.seed)
        self.probe = probe_set(self.example, len(rows), cfg.seed, cfg.probe_size, stream=7919)
        accuracy_signal = getattr(self.policy, "config", {}).get("signal") == "accuracy"  # the preset's if unset
        self.accuracy_probe = (
            probe_set(self.example, len(rows), cfg.seed, cfg.probe_accuracy_size, stream=104729)
            if accuracy_signal else []
        )  # fmt: skip
        self.step_no = 0

    # ------------------------------------------------------------------------------------------------- data
    def _lr_factor(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if cfg.lr_schedule == "linear":  # Hugging Face Trainer's default (OPSD's): to 0 at the last step
            return 1.0 - progress
        return 1.0

    def example(self, i: int) -> Example | None:
        """Tokenized row i, or None (counted) when it is over-long or malformed."""
        if i not in self.examples:
            r, cfg = self.rows[i], self.cfg
            try:
                ex = make_example(self.tokenizer, r["problem"], r["solution"], r["answer"], templates=self.templates)
            except ValueError:
                ex, reason = None, "malformed"
            else:
                too_long = (
                    len(ex.student_prompt) > cfg.max_prompt_tokens
                    or len(ex.teacher_reply_ids) > cfg.max_reference_tokens
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

    # ------------------------------------------------------------------------------------------------- step
    def step(self) -> dict:
        """One optimizer step (the module docstring's phases, in order); returns its metrics."""
        cfg = self.cfg
        self.step_no += 1
        t0 = time.perf_counter()
        batch = self.next_batch()  # the step's global batch, the same on every rank
        t_probe = time.perf_counter()
        before = self.measure_before()
        probe_s = time.perf_counter() - t_probe if before else 0.0  # the accuracy probe's decode, when asked
        mine = distributed.shard(len(batch))  # this rank's problems (all of them with one process)
        local = [batch[j] for j in mine]
        rollouts, n_tokens = self.sample_rollouts(local, mine)
        # 2. exposure: one alpha for the step, decided on rank 0; a cut of each reference's reasoning revealed
        alpha = distributed.broadcast(float(self.policy.exposure()) if distributed.is_main() else None)
        cuts = [ex.cut(alpha, cfg.exposure_mode) for ex in batch]
        sums, head_s = self.score_and_backward(local, [cuts[j] for j in mine], rollouts, n_tokens)
        loss, grad_norm, skipped = self.optimizer_step(sums["loss"] / n_tokens)
        t_observe = time.perf_counter()
        stats = self.observe(sums, n_tokens, loss, skipped, before)
        if "probe_nll" in stats:  # the probe NLL's forward pass, when one ran
            probe_s += time.perf_counter() - t_observe
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
            "revealed_frac": _mean(
                sum(ex.revealed_tokens(c) for ex, c in zip(batch, cuts)),
                sum(len(ex.reasoning_ids) for ex in batch),
            ),
            "skipped_step": int(skipped),
            "tokens_per_s": n_tokens / max(dt - probe_s, 1e-9),  # training throughput: probe measurements excluded
            "step_time_s": dt,  # wall time, probes included
            "probe_s": probe_s,
        }
        if self.parallel.head_sharded:
            metrics["head_gather_s"] = head_s
        metrics.update({f"controller/{k}": float(v) for k, v in self.policy.metrics().items()})
        return metrics

    def measure_before(self) -> dict[str, float]:
        """0. What the policy measures before this step's update, when it asks (rank 0 holds the policy)."""
        before = {}
        if distributed.broadcast(self.policy.wants("probe_accuracy") if distributed.is_main() else None):
            with self.parallel.gathered():
                if distributed.is_main():
                    before["probe_accuracy"] = self.probe_accuracy()
        return before

    def sample_rollouts(self, local: list[Example], mine: range) -> tuple[list[list[list[int]]], int]:
        """1. The current student samples G continuations of each of this rank's problem-only prompts; the draws
        depend on (seed, step, global problem index, sample, position) only, not on the rank. Returns the rollouts
        and the step's global token count (the loss is normalised by it, so N ranks make one process's update)."""
        cfg = self.cfg
        self.model.eval()
        with self.parallel.gathered():
            rollouts = self.rollout.sample(
                [ex.student_prompt for ex in local],
                num_samples=cfg.num_samples,
                max_new_tokens=cfg.max_new_tokens,
                eos_ids=self.eos_ids,
                pad_id=self.tokenizer.pad_token_id,
                temperature=cfg.rollout_temperature,
                top_p=cfg.top_p,
                top_k=cfg.top_k,
                seeds=problem_seeds(cfg.seed, self.step_no, mine),
            )
        n_tokens = int(distributed.all_reduce_sum({"n": sum(len(r) for g in rollouts for r in g)})["n"])
        return rollouts, n_tokens

    def score_and_backward(
        self, local: list[Example], cuts: list[int], rollouts: list[list[list[int]]], n_tokens: int
    ) -> tuple[Counter, float]:
        """3-5. Per micro-batch: teacher scoring (no grad; rollout positions and, when the policy uses it, the
        credit branch), student scoring (grad), the loss summed over the rollout tokens and normalised by the
        step's token count, backward. Returns the step's global sums of the loss and the op's statistics, and the
        seconds spent gathering a sharded head."""
        cfg, model, parallel = self.cfg, self.model, self.parallel
        with_credit = self.policy.uses_credit  # a teacher pass over every reference: only when it is used
        t_head = time.perf_counter()
        weight = parallel.lm_head_weight()  # plain tensor: gathered once per step when --fsdp full shards it
        t_head = time.perf_counter() - t_head
        sums = Counter()
        self.optimizer.zero_grad(set_to_none=True)
        for lo in range(0, len(local), cfg.micro_batch):
            mb = slice(lo, lo + cfg.micro_batch)
            parallel.sync_gradients(lo + cfg.micro_batch >= len(local))  # reduce after the last micro-batch only
            # 3. teacher scoring (no grad): rollout positions (+ the credit branch), one packed tree pass
            with self.teacher.view():
                ht, hc, tc = score_teacher(
                    model, local[mb], cuts[mb], rollouts[mb], self.attention, credit=with_credit
                )
                if with_credit:
                    credit = token_logprobs(hc, weight.detach(), tc)
            # 4. student scoring (grad) over [prompt ; rollouts]
            model.train()
            hs, _ = score_student(model, local[mb], rollouts[mb], self.attention)
            model.eval()
            # 5. loss: summed over the micro-batch's rollout tokens, normalised by the step's token count
            loss_sum, stats = distillation_loss(
                hs, ht, weight, temperature=cfg.kl_temperature, clip=cfg.clip, beta=cfg.beta, reduction="sum"
            )
            (loss_sum * parallel.grad_scale / n_tokens).backward()
            sums["loss"] += loss_sum.item()
            for name, v in stats.items():
                sums[name] += v.sum().item()
            if with_credit:
                sums["credit"] += credit.sum().item()
                sums["credit_tokens"] += credit.numel()
        parallel.reduce_gradients(self.params)
        return distributed.all_reduce_sum(sums), t_head  # global step statistics for the controller and the logs

    def optimizer_step(self, loss: float) -> tuple[float, float, bool]:
        """6. Clip the gradient norm and step, unless the loss or the gradient is not finite (then the weights stay
        untouched and the step counts as skipped). Returns (loss, grad norm, skipped)."""
        grad_norm = float(
            distributed.full_tensor(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
        )
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
        return loss, grad_norm, skipped

    def observe(self, sums: Counter, n_tokens: int, loss: float, skipped: bool, before: dict) -> dict[str, float]:
        """7. The step's statistics for the exposure policy (and the logs), shown to it unless the step was
        skipped: loss, mismatch (KL per token), confidence, progress, what it measured before the update, the
        teacher-grounded credit (engine/scoring.py) and the probe NLL (every --probe-every steps, and where the
        policy asks)."""
        cfg = self.cfg
        stats = {
            "loss": loss,
            "mismatch": sums["kl"] / n_tokens,
            "confidence": sums["student_max_prob"] / n_tokens,
            "progress": self.step_no / cfg.steps,
            **before,
        }
        if self.policy.uses_credit:
            stats["credit"] = _mean(sums["credit"], sums["credit_tokens"])
        wants_nll = distributed.broadcast(self.policy.wants("probe_nll") if distributed.is_main() else None)
        if self.probe and (wants_nll or (cfg.probe_every and self.step_no % cfg.probe_every == 0)):
            with self.parallel.gathered():
                if distributed.is_main():
                    stats["probe_nll"] = self.probe_nll()
        if not skipped and distributed.is_main():
            self.policy.observe(stats)
        return stats

    def probe_nll(self) -> float:
        """The student's NLL per token of the probe set's reference solutions (``engine/probes.py``)."""
        return probe_nll(self.model, self.probe, self.attention)

    def probe_accuracy(self) -> float:
        """The student's greedy accuracy on the accuracy probe (``engine/probes.py``)."""
        return probe_accuracy(self.model, self.rollout, self.tokenizer, self.task, self.accuracy_probe,
                              max_new_tokens=self.cfg.max_new_tokens, eos_ids=self.eos_ids)

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything but the adapter weights that an exact resume needs (trainer_state.json + .safetensors).

        Under torchrun (a collective: every rank calls it) the sharded tensors are gathered whole, as one process
        would save them, and ``ranks`` holds every rank's RNG and data position (the controller is rank 0's)."""
        state = {
            "step": self.step_no,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "controller": self.policy.state_dict(),
            "teacher": self.teacher.state_dict(),
            "data": self.stream.state_dict(),
            "skipped": dict(self.skipped),
            "eval_history": self.evaluator.history,
            "eval_sets": self.evaluator_fingerprints(),
            "rng": checkpoint.rng_state(),
        }
        if distributed.world_size() > 1:
            state = distributed.to_full(state)
            state["world_size"] = distributed.world_size()
            state["ranks"] = distributed.all_gather({"rng": state["rng"], "data": state["data"]})
        return state

    def load_state_dict(self, state: dict) -> None:
        saved, now = state.get("eval_sets"), self.evaluator_fingerprints()
        changed = [n for n in now if saved is not None and n in saved and saved[n] != now[n]]
        if changed:  # accuracies before and after must come from one set of problems
            raise UsageError(
                f"the evaluation set {', '.join(changed)} differs from the one this run evaluated before "
                "(a changed file or problem generator): its accuracies would not be comparable"
            )
        self.step_no = state["step"]
        self.optimizer.load_state_dict(self.parallel.shard_optimizer_state(state["optimizer"], self.params))
        self.scheduler.load_state_dict(state["scheduler"])
        self.policy.load_state_dict(state["controller"])
        self.teacher.load_state_dict(state["teacher"])
        if self.teacher.ema:  # whole tensors from the checkpoint -> this rank's pieces
            params = adapter_params(self.model)
            self.teacher.ema = {n: distributed.shard_like(t, params[n]) for n, t in self.teacher.ema.items()}
        self.stream.load_state_dict(state["data"])
        self.skipped = Counter(state["skipped"])
        self.evaluator.history = state.get("eval_history", {})
        checkpoint.set_rng_state(self._rank_rng(state))

    def _rank_rng(self, state: dict) -> dict:
        """This rank's saved RNG state. Under another world size the ranks' streams cannot be mapped one to one;
        only LoRA dropout draws from them (rollouts are keyed by problem, not by rank), so the run continues with
        rank 0's state on rank 0 and fresh streams elsewhere."""
        saved, now, r = state.get("world_size", 1), distributed.world_size(), distributed.rank()
        if saved == now:
            return state["ranks"][r]["rng"] if "ranks" in state else state["rng"]
        if distributed.is_main():
            log.warning(
                "resuming a %d-process checkpoint on %d processes: batch, data position, adapter, optimizer and "
                "controller carry over; per-rank RNG streams (LoRA dropout only) are re-seeded",
                saved,
                now,
            )
        if r > 0:
            torch.manual_seed(self.cfg.seed * 1_000_003 + r + 7919 * self.step_no)
            return checkpoint.rng_state()
        return state["rng"]

    def evaluator_fingerprints(self) -> dict[str, str]:
        """sha256 of each evaluation set's problems and answers (stored in the state, compared on resume)."""
        return {
            name: hashlib.sha256(
                json.dumps([[p["problem"], str(p["answer"])] for p in problems]).encode()
            ).hexdigest()
            for name, problems in self.evaluator.sets.items()
        }

    def save(self) -> str:
        """checkpoints/step-XXXXXX under the run directory, written atomically (engine/checkpoint.py) with the
        tokenizer and a portable base-model reference; under torchrun every rank gathers, rank 0 writes, and all
        return once the checkpoint is in place."""
        state = self.state_dict()
        adapter = distributed.to_full(adapter_params(self.model)) if distributed.world_size() > 1 else None
        path = os.path.join(self.run_dir, checkpoint.checkpoint_name(self.step_no))
        if distributed.is_main():
            path = checkpoint.save(
                self.run_dir,
                self.step_no,
                self.model,
                state,
                tokenizer=self.tokenizer,
                base_model=checkpoint.portable_model_ref(self.cfg.model),
                adapter_state_dict=adapter,
            )
        distributed.barrier()
        return path

    def load(self, path: str) -> None:
        adapter, state = checkpoint.read(path, map_location=state_location())
        self.restore(adapter, state)

    def restore(self, adapter: dict, state: dict) -> None:
        """Adapter weights and trainer state read from a checkpoint (checkpoint.read / load_latest)."""
        self.load_state_dict(state)
        with self.parallel.loading():
            checkpoint.apply_adapter(self.model, adapter)

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out evaluation at ``step`` (problems sharded over the ranks, on whole parameters)."""
        with self.parallel.gathered():
            return self.evaluator.run(self.model, self.tokenizer, step)


def training_rows(cfg: Config) -> tuple[list[dict], Counter]:
    """(usable rows, skip counts by reason) of ``cfg.data``; none usable is a DataError naming the source."""
    raw = load_rows(
        cfg.data,
        split=cfg.split,
        problem_column=cfg.problem_column,
        solution_column=cfg.solution_column,
        answer_column=cfg.answer_column,
        seed=cfg.seed,
        task_options=cfg.task_options,
    )
    rows, skipped = clean_rows(raw)
    if not rows:
        counts = ", ".join(f"{k} {v}" for k, v in skipped.items()) or "the source is empty"
        hint = (
            f"; no row has both {cfg.problem_column!r} and {cfg.solution_column!r} "
            "(see --problem-column / --solution-column)"
            if raw and skipped.get("missing_field") == len(raw)
            else ""
        )
        raise DataError(f"--data {cfg.data!r}: no usable training row of {len(raw)} ({counts}){hint}")
    return rows, skipped
