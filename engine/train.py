"""On-policy self-distillation with adaptive teacher exposure: ``python -m engine.train --help``.

One optimizer step (``Trainer.step``), top to bottom:
rollout -> exposure -> teacher scoring -> student scoring -> loss -> backward / step -> controller
bookkeeping.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
import uuid
from collections import Counter

import numpy as np
import torch
import yaml

from atesd import controller
from atesd.engine import checkpoint, distributed
from atesd.engine.config import Config, diff_run, locate_run, parse_invocation, read_run_config
from atesd.engine.data import DataStream, clean_rows, load_rows
from atesd.engine.errors import DataError, RankLost, UsageError
from atesd.engine.evaluate import grade_all, task_grader
from atesd.engine.evaluator import Evaluator
from atesd.engine.exposure import Example, make_example
from atesd.engine.loss import describe_loss_backend, distillation_loss, token_logprobs
from atesd.engine.models import Teacher, adapter_params, add_lora, lm_head_weight, load_model, recipe_name
from atesd.engine.packing import Segment, pack
from atesd.engine.rollout import build_rollout
from atesd.engine.sampling import problem_seeds
from atesd.engine.scoring import _gather, hidden_states, score_student, score_teacher
from atesd.engine.task import get_task, resolve_templates

log = logging.getLogger("engine")
TIMING_KEYS = ("tokens_per_s", "step_time_s")


def _device(cfg: Config) -> torch.device:
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if distributed.world_size() > 1 and device.type == "cuda":  # each rank on cuda:LOCAL_RANK
        if device.index is not None:
            raise ValueError(f"--device {cfg.device}: under torchrun pass --device cuda (rank r uses cuda:LOCAL_RANK)")
        device = torch.device("cuda", torch.cuda.current_device())
    return device


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
        self.device = _device(cfg)
        log.info("loss backend: %s", describe_loss_backend(self.device))
        self.attention = (
            cfg.attention if cfg.attention != "auto" else ("flex" if self.device.type == "cuda" else "dense")
        )
        base, self.tokenizer = load_model(cfg.model, dtype=_dtype(cfg, self.device), device=str(self.device))
        if cfg.gradient_checkpointing == "on" or (
            cfg.gradient_checkpointing == "auto" and self.device.type == "cuda"
        ):
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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
        self.probe = self._probe_set()
        accuracy_signal = getattr(self.policy, "config", {}).get("signal") == "accuracy"  # the preset's if unset
        self.accuracy_probe = self._probe_set(cfg.probe_accuracy_size, stream=104729) if accuracy_signal else []
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

    def _probe_set(self, size: int | None = None, stream: int = 7919) -> list[Example]:
        """``size`` (default --probe-size) fixed training examples, drawn by the run's seed and ``stream``."""
        size = self.cfg.probe_size if size is None else size
        order = np.random.default_rng([self.cfg.seed, stream]).permutation(len(self.rows))
        probe = []
        for i in order[: 4 * size]:
            ex = self.example(int(i))
            if ex is not None and len(probe) < size:
                probe.append(ex)
        return probe

    # ------------------------------------------------------------------------------------------------- step
    def step(self) -> dict:
        cfg, model, parallel = self.cfg, self.model, self.parallel
        self.step_no += 1
        t0 = time.perf_counter()
        examples = self.next_batch()  # the step's global batch, the same on every rank
        # 0. what the controller measures before this step's update, when it asks (rank 0 holds the policy)
        stats_before = {}
        if distributed.broadcast(self.policy.wants("probe_accuracy") if distributed.is_main() else None):
            with parallel.gathered():
                if distributed.is_main():
                    stats_before["probe_accuracy"] = self.probe_accuracy()
        mine = distributed.shard(len(examples))  # this rank's problems (all of them with one process)
        local = [examples[j] for j in mine]

        # 1. rollout: the current student samples G continuations of each of this rank's problem-only prompts;
        # the draws depend on (seed, step, global problem index, sample, position) only, not on the rank
        model.eval()
        with parallel.gathered():
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
        # the loss is normalised by the global token count, so N ranks make one process's update
        n_tokens = int(distributed.all_reduce_sum({"n": sum(len(r) for g in rollouts for r in g)})["n"])

        # 2. exposure: one alpha for the step, decided on rank 0; a cut of each reference's reasoning revealed
        alpha = distributed.broadcast(float(self.policy.exposure()) if distributed.is_main() else None)
        cuts = [ex.cut(alpha, cfg.exposure_mode) for ex in examples]
        local_cuts = [cuts[j] for j in mine]

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
                    model, local[mb], local_cuts[mb], rollouts[mb], self.attention, credit=with_credit
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
        sums = distributed.all_reduce_sum(sums)  # global step statistics for the controller and the logs

        # 6. optimizer step, unless the loss or the gradient is not finite
        loss = sums["loss"] / n_tokens
        grad_norm = float(
            distributed.full_tensor(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
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

        # 7. controller bookkeeping
        stats = {
            "loss": loss,
            "mismatch": sums["kl"] / n_tokens,
            "confidence": sums["student_max_prob"] / n_tokens,
            "progress": self.step_no / cfg.steps,
            **stats_before,
        }
        if with_credit:  # the paper's teacher-grounded credit (engine/scoring.py)
            stats["credit"] = _mean(sums["credit"], sums["credit_tokens"])
        # the probe NLL: every --probe-every steps, and where the controller asks (signal probe_nll)
        wants_nll = distributed.broadcast(self.policy.wants("probe_nll") if distributed.is_main() else None)
        if self.probe and (wants_nll or (cfg.probe_every and self.step_no % cfg.probe_every == 0)):
            with parallel.gathered():
                if distributed.is_main():
                    stats["probe_nll"] = self.probe_nll()
        if not skipped and distributed.is_main():
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
            "revealed_frac": _mean(
                sum(ex.revealed_tokens(c) for ex, c in zip(examples, cuts)),
                sum(len(ex.reasoning_ids) for ex in examples),
            ),
            "skipped_step": int(skipped),
            "tokens_per_s": n_tokens / dt,
            "step_time_s": dt,
        }
        if parallel.head_sharded:
            metrics["head_gather_s"] = t_head
        metrics.update({f"controller/{k}": float(v) for k, v in self.policy.metrics().items()})
        return metrics

    @torch.no_grad()
    def probe_nll(self) -> float:
        """Student NLL (per token) of the probe set's reference solutions given the student prompt."""
        trees = [
            [Segment(ex.student_prompt), Segment(ex.student_reply_ids, 0)] for ex in self.probe
        ]
        packed = pack(trees)
        h, tgt = _gather(hidden_states(self.model, packed, self.attention), packed, trees, lambda t: [1])
        return -token_logprobs(h, lm_head_weight(self.model), tgt).mean().item()

    @torch.no_grad()
    def probe_accuracy(self) -> float:
        """Greedy accuracy of the student on the accuracy probe (fixed training problems), graded by the task's
        verifier (math-verify in a worker when the task has none): the ``signal="accuracy"`` controller's input."""
        model, exs = self.model, self.accuracy_probe
        model.eval()
        outs = self.rollout.sample(
            [ex.student_prompt for ex in exs], num_samples=1, max_new_tokens=self.cfg.max_new_tokens,
            eos_ids=self.eos_ids, pad_id=self.tokenizer.pad_token_id, temperature=0.0,
        )  # fmt: skip
        texts = self.tokenizer.batch_decode([g[0] for g in outs], skip_special_tokens=True)
        with task_grader(self.task, workers=1) as grader:
            flags = grade_all(grader, texts, [ex.answer for ex in exs])
        return sum(flags) / len(flags)

    # ------------------------------------------------------------------------------------------- checkpoint
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
        adapter, state = checkpoint.read(path, map_location=_state_location())
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


def _state_location() -> str | None:
    """Where a checkpoint's tensors load: the CPU under torchrun (whole tensors, sharded afterwards)."""
    return "cpu" if distributed.world_size() > 1 else None


def training_rows(cfg: Config) -> tuple[list[dict], Counter]:
    """(usable rows, skip counts by reason) of ``cfg.data``; none usable is a DataError naming the source."""
    raw = load_rows(
        cfg.data,
        split=cfg.split,
        problem_column=cfg.problem_column,
        solution_column=cfg.solution_column,
        answer_column=cfg.answer_column,
        lab_size=cfg.lab_size,
        lab_levels=cfg.lab_level_tuple(),
        seed=cfg.seed,
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


# ------------------------------------------------------------------------------------------- run lifecycle
class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped the run; the message says where its last checkpoint is."""


class _StopRequests:
    """SIGINT / SIGTERM while training: finish the current step, checkpoint it and stop cleanly. A second
    Ctrl-C stops at once (the last checkpoint stays the newest). Handlers are installed in the main thread only."""

    def __enter__(self) -> _StopRequests:
        self.signal: str | None = None
        self.saved = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        print(
            f"\n{self.signal}: stopping after this step and saving a checkpoint (Ctrl-C again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def agree(self) -> None:
        """Under torchrun, a stop request any rank received applies to all (each must save the same step)."""
        if distributed.world_size() > 1:
            asked = distributed.all_gather(self.signal)
            self.signal = next((s for s in asked if s is not None), None)

    def __exit__(self, *exc) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


class Reporters:
    """Where metrics go besides metrics.jsonl: TensorBoard (``tb/``) and/or Weights & Biases (``--report-to``)."""

    def __init__(self, cfg: Config, run_dir: str, enabled: bool = True) -> None:
        targets = {t.strip() for t in cfg.report_to.split(",")} - {"none", ""} if enabled else set()
        self.tb = self.wandb = None
        if "wandb" in targets:
            self.wandb = _wandb_run(cfg, run_dir)
        if "tensorboard" in targets:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tb"))

    def log(self, metrics: dict, step: int) -> None:
        scalars = {k: v for k, v in metrics.items() if k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_run(cfg: Config, run_dir: str):
    """A wandb run for this run directory (its id kept in wandb_id.txt, so --resume continues the same run);
    project from $WANDB_PROJECT (default 'atesd'), files under <run>/wandb."""
    try:
        import wandb
    except ImportError:
        raise UsageError("--report-to wandb: the wandb package is not installed (pip install wandb)") from None
    id_path = os.path.join(run_dir, "wandb_id.txt")
    if os.path.exists(id_path):
        with open(id_path) as fh:
            run_id = fh.read().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        with open(id_path, "w") as fh:
            fh.write(run_id + "\n")
    try:
        return wandb.init(
            project=os.environ.get("WANDB_PROJECT", "atesd"),
            name=os.path.basename(os.path.abspath(run_dir)),
            id=run_id,
            resume="allow",
            dir=run_dir,
            config=cfg.run_dict(),
        )
    except Exception as e:  # not logged in, no network: say so before the model loads
        first = (str(e).strip().splitlines() or [""])[0]
        raise UsageError(
            f"--report-to wandb: wandb.init failed: {type(e).__name__}: {first} (run `wandb login`, or set "
            "WANDB_MODE=offline)"
        ) from None


def _write_atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as fh:
        fh.write(text)
    os.replace(path + ".tmp", path)


def _new_run_dir(cfg: Config) -> str:
    """The directory of a new run: --output-dir (refused if it holds a run with checkpoints, which --resume
    continues), else runs/<model>-<time> (suffixed if taken)."""
    if cfg.output_dir:
        found = checkpoint.checkpoints(cfg.output_dir)
        if found:
            raise UsageError(
                f"--output-dir {cfg.output_dir!r} already holds a run (newest checkpoint "
                f"{os.path.basename(found[-1])}): continue it with --resume {cfg.output_dir}, or choose another "
                "--output-dir"
            )
        return cfg.output_dir
    base = os.path.join("runs", f"{os.path.basename(cfg.model.rstrip('/'))}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir, n = base, 1
    while os.path.exists(run_dir):
        n += 1
        run_dir = f"{base}-{n}"
    return run_dir


def train(cfg: Config, resume: str | None = None) -> str:
    """Run a new training run, or continue one (``resume``: ``'auto'`` = ``cfg.output_dir``, a run directory or
    one of its checkpoints); returns the run directory. Nothing is written outside it.

    Bad input is a :class:`UsageError` raised before anything is written where possible (after that, it is
    recorded in the run's run.log, like every failure). Ctrl-C finishes the step, checkpoints it and raises
    :class:`Interrupted` naming the checkpoint. Under torchrun (WORLD_SIZE > 1) the ranks join one process group
    and train one model data-parallel; rank 0 writes every output."""
    cfg.validate()
    with distributed.process_group(_device(cfg).type, cfg.dist_timeout):
        try:
            return _train_in_group(cfg, resume)
        except RuntimeError as e:  # a rank died or stalled: say so in one line, not as a backend trace
            if not distributed.is_collective_failure(e):
                raise
            raise RankLost(
                f"rank {distributed.rank()} of {distributed.world_size()} lost contact with another rank during a "
                f"collective (it died, or did not answer within --dist-timeout {cfg.dist_timeout:g}s; see the "
                f"launcher's summary for which): {distributed.first_line(e)}"
            ) from e


def _train_in_group(cfg: Config, resume: str | None) -> str:
    world = distributed.world_size()
    distributed.check_same_config(dataclasses.asdict(cfg))
    if cfg.batch_size % world:
        raise UsageError(f"--batch-size {cfg.batch_size} must be a multiple of the number of processes ({world})")
    changed: dict = {}
    named = None
    if resume:
        run_dir, named = locate_run(resume, cfg.output_dir)
        checkpoint.check_run_dir(run_dir)  # before run.log is opened: a link out of the run is refused first
        conflicts, changed = diff_run(read_run_config(run_dir), cfg)
        if conflicts:
            raise UsageError(f"--resume {run_dir}: {', '.join(conflicts)} differ from the run's config.yaml")
    else:
        run_dir = distributed.broadcast(_new_run_dir(cfg))  # rank 0's name: the ranks' clocks may straddle a second
    os.makedirs(run_dir, exist_ok=True)
    if not distributed.is_main():  # rank 0 keeps run.log; the others report warnings on stderr
        return _train(cfg, run_dir, bool(resume), named, changed)
    handler = logging.FileHandler(os.path.join(run_dir, "run.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)

    def record(level: int, message: str, exc_info=None) -> None:
        """The run's outcome, into run.log only: the entry point prints it once, as one line."""
        handler.handle(log.makeRecord(log.name, level, __file__, 0, "%s", (message,), exc_info))

    try:
        return _train(cfg, run_dir, bool(resume), named, changed)
    except Interrupted as e:
        record(logging.WARNING, str(e))
        raise
    except KeyboardInterrupt:
        newest = checkpoint.checkpoints(run_dir)
        message = "interrupted" + (
            f"; the last checkpoint is {newest[-1]} (continue with --resume {run_dir})"
            if newest
            else f" before the first checkpoint of {run_dir}"
        )
        record(logging.WARNING, message)
        raise Interrupted(message) from None
    except UsageError as e:
        record(logging.ERROR, f"run failed: {e}")
        raise
    except Exception as e:
        record(logging.ERROR, f"run failed: {type(e).__name__}: {e}", sys.exc_info())
        e.run_log = os.path.join(run_dir, "run.log")
        raise
    finally:
        log.removeHandler(handler)
        handler.close()


def _truncate_metrics(path: str, step: int) -> None:
    """Keep metrics.jsonl's lines up to ``step`` (the checkpoint resumed from); a line that does not parse (a
    write cut off by a kill) is dropped and logged."""
    with open(path, "rb") as fh:
        lines = fh.read().split(b"\n")
    kept, unreadable, later = [], [], 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            unreadable.append(number)
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            kept.append(line.decode("utf-8") + "\n")
        else:
            later += 1
    if unreadable:
        log.warning(
            "metrics.jsonl: dropped %d unreadable line(s) (line %s; a write cut off by the interruption)",
            len(unreadable),
            ", ".join(map(str, unreadable)),
        )
    if later:
        log.info("metrics.jsonl: dropped %d line(s) after step %d (written after the last checkpoint)", later, step)
    _write_atomic(path, "".join(kept))


def _train(cfg: Config, run_dir: str, resume: bool, named: str | None, changed: dict) -> str:
    main = distributed.is_main()  # rank 0 writes every output; all ranks train and evaluate
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if resume:
        log.info("resuming run %s with its config.yaml", run_dir)
        for name, (old, new) in changed.items():
            log.info("--%s changed on --resume: %s -> %s", name.replace("_", "-"), old, new)
    if main:
        _write_atomic(os.path.join(run_dir, "config.yaml"), yaml.safe_dump(cfg.run_dict(), sort_keys=False))
    log.info("this invocation: progress=%s stop_after=%s", cfg.progress, cfg.stop_after)
    preset = recipe_name(cfg.model)
    log.info("recipe: %s", f"{preset} (model {cfg.model})" if preset else "the generic defaults (no preset matches "
             f"{cfg.model!r}; the 1.7B/4B training settings, no benchmark evaluation unless asked)")
    if not (cfg.progress and main):  # no bars at all, transformers' weight-loading bar included
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    reporters = Reporters(cfg, run_dir, enabled=main)  # before the model: a wandb problem shows in seconds
    try:
        trainer = Trainer(cfg, run_dir)
        if resume:  # every rank verifies and reads the same newest intact checkpoint
            found = checkpoint.load_latest(run_dir, named, map_location=_state_location())
            if found is None:
                log.warning("no checkpoint under %s yet: starting the run over from step 0", run_dir)
                resume = False
            else:
                path, adapter, state = found
                if state["step"] > cfg.steps:
                    raise UsageError(f"--steps {cfg.steps} is below step {state['step']} of checkpoint {path}")
                trainer.restore(adapter, state)
                log.info("resumed from %s at step %d", path, trainer.step_no)
                if main and os.path.exists(metrics_path):  # drop lines written after the checkpoint
                    _truncate_metrics(metrics_path, trainer.step_no)
                trainer.evaluator.write()  # drop evaluations the interrupted run made after its last checkpoint
        if not resume:
            if main:
                open(metrics_path, "w").close()
                for stale in ("summary.json", "eval_summary.json"):
                    if os.path.exists(os.path.join(run_dir, stale)):
                        os.remove(os.path.join(run_dir, stale))
            if trainer.evaluator.due(0):
                trainer.evaluate(0)
        log.info(
            "run %s: model %s, data %s (%d rows; skipped %s), exposure %s",
            run_dir,
            cfg.model,
            cfg.data,
            len(trainer.rows),
            dict(trainer.skipped),
            cfg.exposure,
        )
        _loop(trainer, cfg, metrics_path, reporters)
        if trainer.step_no >= cfg.steps:
            _finish(trainer, cfg, run_dir, reporters)
    finally:
        reporters.close()
    return run_dir


def _loop(trainer: Trainer, cfg: Config, metrics_path: str, reporters: Reporters) -> None:
    """Steps up to --steps (or --stop-after): metrics, evaluations, checkpoints; a stop request (Ctrl-C,
    SIGTERM) ends it after the current step with a checkpoint and raises Interrupted."""
    from tqdm import tqdm

    main = distributed.is_main()
    bar = tqdm(
        total=cfg.steps, initial=trainer.step_no, disable=not (cfg.progress and main), desc="train", file=sys.stderr
    )
    last = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
    saved_at = trainer.step_no
    with _StopRequests() as stop, open(metrics_path if main else os.devnull, "a") as out:
        while trainer.step_no < last and stop.signal is None:
            m = trainer.step()
            # evaluated before the save, so the checkpoint's state holds this step's evaluation too
            evaluated = trainer.evaluator.due(m["step"])
            if evaluated:
                m.update(trainer.evaluate(m["step"]))
            stop.agree()  # one rank's Ctrl-C stops every rank after the same step
            out.write(json.dumps(m) + "\n")
            out.flush()
            reporters.log(m, m["step"])
            bar.update(1)
            bar.set_postfix(
                loss=f"{m['loss']:.4f}", alpha=f"{m['alpha']:.2f}", tok_s=f"{m['tokens_per_s']:.0f}"
            )
            if evaluated or m["step"] % cfg.save_every == 0 or m["step"] == cfg.steps or stop.signal:
                trainer.save()
                saved_at = trainer.step_no
    bar.close()
    if stop.signal is not None and trainer.step_no < cfg.steps:  # (a signal during the last step: it finishes)
        if saved_at != trainer.step_no:
            trainer.save()
            saved_at = trainer.step_no
        path = os.path.join(trainer.run_dir, checkpoint.checkpoint_name(saved_at))
        raise Interrupted(
            f"stopped by {stop.signal} after step {trainer.step_no}; checkpoint {path}; continue with "
            f"--resume {trainer.run_dir}"
        )


def _finish(trainer: Trainer, cfg: Config, run_dir: str, reporters: Reporters) -> None:
    main = distributed.is_main()
    if hasattr(trainer.policy, "finish") and main:
        trainer.policy.finish()
    log.info("finished %d steps; skipped rows %s", trainer.step_no, dict(trainer.skipped))
    ev = trainer.evaluator
    if ev.due(cfg.steps) and not ev.done(cfg.steps):  # resumed after the last save, before its evaluation
        reporters.log(trainer.evaluate(cfg.steps), cfg.steps)
    if not main:
        return
    for name in ev.history:
        b, base = ev.best(name), ev.base(name)
        if b is None:
            continue
        before = f"; base model {base['accuracy']:.3f}" if base else ""
        print(f"best {name} accuracy: {b['accuracy']:.3f} at step {b['step']} "
              f"({os.path.join(run_dir, b['checkpoint'])}){before}", flush=True)
    _write_atomic(os.path.join(run_dir, "summary.json"), json.dumps(run_summary(run_dir, cfg, ev), indent=1))


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
            "base": evaluator.base(name),
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


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())


def main(argv: list[str] | None = None) -> dict:
    """CLI entry point; returns the run's summary.json content (``{"run_dir", "finished": False}`` if stopped
    early by --stop-after). Errors: bad input is one line on stderr and exit code 2; Ctrl-C exit code 130 naming
    the last checkpoint; anything else (a bug) one line and exit code 1, its traceback in run.log (and on the
    terminal with --debug)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    rank = distributed.launched_rank()
    who = f"[rank {rank}] " if distributed.launched_world_size() > 1 else ""
    terminal = logging.StreamHandler()  # the terminal gets warnings; run.log gets everything
    terminal.setLevel(logging.WARNING)
    terminal.setFormatter(logging.Formatter(f"{who}%(levelname)s %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[terminal])  # (a no-op when logging is set up already)
    try:
        inv = parse_invocation(argv)
        run_dir = train(inv.config, inv.resume)
    except UsageError as e:
        if debug:
            raise
        distributed.record_error(e)  # torchrun's failure summary then names the cause
        _exit(f"{who}error: {_one_line(e)}", 2)
    except KeyboardInterrupt as e:
        if debug:
            raise
        _exit(who + (_one_line(e) if isinstance(e, Interrupted) else "interrupted"), 130)
    except RankLost as e:
        if debug:
            raise
        distributed.record_error(e)
        _exit(f"{who}error: {_one_line(e)}", 1)
    except Exception as e:
        if debug:
            raise
        distributed.record_error(e)
        where = getattr(e, "run_log", None)
        more = f"the traceback is in {where}" if where else "run with --debug for the traceback"
        _exit(f"{who}error: {type(e).__name__}: {_one_line(e)} ({more})", 1)
    if rank > 0:
        return {"run_dir": run_dir, "rank": rank}
    print(f"run directory: {run_dir}")
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        return {"run_dir": run_dir, "finished": False}
    with open(path) as fh:
        return json.load(fh)


def _exit(message: str, code: int):
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(code)


def cli() -> None:
    """Console-script entry point (``atesd-train``): :func:`main` without its return value."""
    main()


if __name__ == "__main__":
    main()
