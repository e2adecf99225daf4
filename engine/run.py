"""A training run's lifecycle around the trainer's steps (``engine/trainer.py``): :func:`train`.

    train(cfg, resume)      the run directory (new, or the one resumed and checked), run.log, config.yaml
      _train                the trainer, the resumed checkpoint (metrics.jsonl cut back to it), evaluation at
                            step 0, the loop, the summary
        _loop               steps up to --steps (or --stop-after): metrics.jsonl, TensorBoard / wandb
                            (:class:`Reporters`), evaluations, checkpoints; Ctrl-C / SIGTERM finish the step,
                            checkpoint it and stop (:class:`Interrupted`)
        _finish             the policy's finish, the last evaluation, summary.json (:func:`run_summary`)

Nothing is written outside the run directory; under torchrun rank 0 writes every output.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import uuid

import yaml

from atesd.engine import checkpoint, distributed, threads
from atesd.engine.config import Config
from atesd.engine.errors import RankLost, UsageError
from atesd.engine.evaluator import Evaluator
from atesd.engine.invocation import diff_run, locate_run, read_run_config
from atesd.engine.models import ModelLoadError, offline_problem, recipe_name
from atesd.engine.trainer import Trainer, state_location

log = logging.getLogger("engine")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped the run; the message says where its last checkpoint is."""


class _StopRequests:
    """SIGINT / SIGTERM while training: finish the current step, checkpoint it and stop cleanly. A second
    Ctrl-C stops at once (the last checkpoint stays the newest). Handlers are installed in the main thread only.

    Under torchrun a request counts once the ranks have agreed on it (:meth:`agree`, once per step): a signal that
    lands on one rank after that step's agreement (e.g. while it saves) waits for the next step's, so no rank ever
    stops a step before the others and leaves them blocked in a collective."""

    def __enter__(self) -> _StopRequests:
        self.requested: str | None = None  # the signal this rank received
        self.signal: str | None = None  # the stop every rank acts on (this rank's own request in one process)
        self.saved = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        if distributed.world_size() == 1:
            self.signal = self.requested
        when = "this step" if distributed.world_size() == 1 else "the step every rank has agreed to stop at"
        print(
            f"\n{self.requested}: stopping after {when} and saving a checkpoint (Ctrl-C again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def agree(self) -> None:
        """Under torchrun, a stop request any rank received applies to all (each must save the same step)."""
        if distributed.world_size() > 1:
            asked = distributed.all_gather(self.requested)
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
    with distributed.process_group(distributed.device_of(cfg.device).type, cfg.dist_timeout):
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
    before: set[str] | None = None  # a new run's directory entries before it starts (a failed start is undone)
    fresh: str | None = None  # ... and the outermost directory its start creates (run_dir or an ancestor)
    if resume:
        run_dir, named = locate_run(resume, cfg.output_dir)
        checkpoint.check_run_dir(run_dir)  # before run.log is opened: a link out of the run is refused first
        conflicts, changed = diff_run(read_run_config(run_dir), cfg)
        if conflicts:
            raise UsageError(f"--resume {run_dir}: {', '.join(conflicts)} differ from the run's config.yaml")
        newer = _newer_than(run_dir, named)
        if newer and not cfg.force:
            raise UsageError(
                f"--resume {named}: the run has newer checkpoints ({', '.join(map(os.path.basename, newer))}) and "
                f"their metrics; resuming here would overwrite them: resume the newest with --resume {run_dir}, "
                "train from here into a new run with --output-dir (after copying the run), or add --force to move "
                "the newer checkpoints and metrics aside (into the run's superseded-<time>/)"
            )
        if newer and distributed.is_main():
            _set_aside(run_dir, newer)
        distributed.barrier()
    else:
        run_dir = distributed.broadcast(_new_run_dir(cfg))  # rank 0's name: the ranks' clocks may straddle a second
        before = set(os.listdir(run_dir)) if os.path.isdir(run_dir) else set()
        fresh = _outermost_missing(run_dir)
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--output-dir {run_dir!r}: cannot create it: {e.strerror or e}") from None
    if not distributed.is_main():  # rank 0 keeps run.log; the others report warnings on stderr
        return _train(cfg, run_dir, bool(resume), named, changed)
    try:
        return _train_logged(cfg, run_dir, resume, named, changed)
    except UsageError as e:
        if before is not None and not getattr(e, "after_start", False):  # bad input: a new run leaves nothing
            _undo_start(run_dir, before, fresh)
        raise


def _outermost_missing(path: str) -> str | None:
    """The outermost directory ``os.makedirs(path)`` would create (``runs/`` for a first run), or None."""
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        missing, path = path, os.path.dirname(path)
    return missing


def _undo_start(run_dir: str, before: set[str], fresh: str | None) -> None:
    """Remove what a new run created before its start failed: the entries it added to an existing directory, or
    every directory it created (``fresh``)."""
    import shutil

    if fresh is not None:
        shutil.rmtree(fresh, ignore_errors=True)
        return
    for entry in set(os.listdir(run_dir)) - before:
        path = os.path.join(run_dir, entry)
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


def _newer_than(run_dir: str, named: str | None) -> list[str]:
    """The run's checkpoints after the one ``--resume`` names (none when it names the run)."""
    if named is None:
        return []
    all_ = checkpoint.checkpoints(run_dir)
    key = os.path.basename(os.path.normpath(named))
    return [c for c in all_ if os.path.basename(c) > key]


def _set_aside(run_dir: str, newer: list[str]) -> str:
    """Move the checkpoints after the resumed one, and copies of the run's metrics and summaries, into
    ``run_dir/superseded-<time>/``: a fork keeps what it replaces."""
    import shutil

    aside = os.path.join(run_dir, f"superseded-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(os.path.join(aside, "checkpoints"))
    for path in newer:
        shutil.move(path, os.path.join(aside, "checkpoints", os.path.basename(path)))
    for name in ("metrics.jsonl", "eval_summary.json", "summary.json"):
        if os.path.exists(os.path.join(run_dir, name)):
            shutil.copy2(os.path.join(run_dir, name), os.path.join(aside, name))
    print(f"--force: moved {len(newer)} newer checkpoint(s) and copies of the metrics into {aside}", file=sys.stderr,
          flush=True)
    return aside


def _train_logged(cfg: Config, run_dir: str, resume: str | None, named: str | None, changed: dict) -> str:
    """Rank 0: :func:`_train` with run.log, every outcome recorded there."""
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
        log.info("metrics.jsonl: dropped %d line(s) after step %d, the checkpoint resumed from", later, step)
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
    if distributed.device_of(cfg.device).type == "cpu":
        log.info(threads.describe())
    preset = recipe_name(cfg.model)
    log.info("recipe: %s", f"{preset} (model {cfg.model})" if preset else "the generic defaults (no preset matches "
             f"{cfg.model!r}; the 1.7B/4B training settings, no benchmark evaluation unless asked)")
    if not (cfg.progress and main):  # no bars at all, transformers' weight-loading bar included
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    reporters = Reporters(cfg, run_dir, enabled=main)  # before the model: a wandb problem shows in seconds
    started = False
    try:
        problem = offline_problem(cfg.model)  # before the data and benchmarks load: the model is the first thing
        if problem:
            raise ModelLoadError(problem)
        trainer = Trainer(cfg, run_dir)
        if resume:  # every rank verifies and reads the same newest intact checkpoint
            found = checkpoint.load_latest(run_dir, named, map_location=state_location())
            if found is None:
                log.warning("no checkpoint under %s yet: starting the run over from step 0", run_dir)
                resume = False
            else:
                path, adapter, state = found
                if state["step"] > cfg.steps:
                    raise UsageError(f"--steps {cfg.steps} is below step {state['step']} of checkpoint {path}")
                trainer.restore(adapter, state)
                log.info("resumed from %s at step %d", path, trainer.step_no)
                if main:
                    print(f"resuming {run_dir} from step {trainer.step_no} ({path})", file=sys.stderr, flush=True)
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
        started = True
        _loop(trainer, cfg, metrics_path, reporters)
        if trainer.step_no >= cfg.steps:
            _finish(trainer, cfg, run_dir, reporters)
    except UsageError as e:
        e.after_start = started  # a failure before the first step of a new run removes the directory it made
        raise
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
            changed = threads.follow_load()  # CPU runs: the thread count follows other processes' load
            if changed:
                log.info("%s", changed)
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
    summary = run_summary(run_dir, cfg, ev)
    if summary["policy"]:
        print(describe_policy(summary["policy"]), flush=True)
    _write_atomic(os.path.join(run_dir, "summary.json"), json.dumps(summary, indent=1))


def describe_policy(p: dict) -> str:
    """One line on whether the adaptive policy learned: a user reading only the run's end should know when ATESD's
    exposure was in fact drawn from its prior (docs/controller.md: short runs, noisy rewards)."""
    line = f"adaptive exposure: final Beta mean {p['beta_mean']:.2f}, concentration {p['beta_concentration']:.1f}"
    if p["gate_open_steps"] is None:
        return line
    tail = p.get("exploit_steps")
    if p["gate_open_steps"] == 0:
        but = f" except {tail} steps near the end, set by --controller-exploit-end" if tail else ""
        return line + ("; its rewards never passed the noise gate, so every alpha was drawn from the prior Beta(2, 2)"
                       f"{but} (docs/controller.md)")
    line += f"; noise gate open at {p['gate_open_steps']} steps (max {p['gate_max']:.2f})"
    return line + (f"; {tail} steps near the end set by --controller-exploit-end instead of drawn" if tail else "")


def run_summary(run_dir: str, cfg: Config, evaluator: Evaluator) -> dict:
    """Headline numbers of a finished run (summary.json): accuracy before/after (on the --data task's held-out
    split when it was evaluated, else the first benchmark), token-weighted mean KL and top-1 agreement over the
    run's non-skipped steps, mean alpha, and an adaptive policy's state at the end (:func:`policy_summary`)."""
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
    head = evals.get(cfg.data) or next(iter(evals.values()), {})
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
        "policy": policy_summary(rows),
        "eval": evals,
    }


def policy_summary(rows: list[dict]) -> dict | None:
    """Where an adaptive policy ran (its controller/beta_* metrics were logged): its Beta after the last step
    (mean, concentration a + b), the largest SNR gate and the number of steps the gate was open (None without a
    gate: the reinforce update), and the steps exploit_end set instead of a draw (None when it was off).
    None where no adaptive policy ran."""
    last = next((r for r in reversed(rows) if "controller/beta_mean" in r), None)
    if last is None:
        return None
    gates = [r["controller/gate"] for r in rows if "controller/gate" in r]  # window update only (not reinforce)
    exploit = [r["controller/exploit"] for r in rows if "controller/exploit" in r]
    return {"beta_mean": last["controller/beta_mean"], "beta_concentration": last["controller/beta_concentration"],
            "gate_max": max(gates) if gates else None, "gate_open_steps": sum(g > 0 for g in gates) if gates else None,
            "exploit_steps": sum(e > 0 for e in exploit) if exploit else None}
