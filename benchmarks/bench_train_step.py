"""One ``engine.train`` step at a Qwen3 shape, its wall time split by phase (the GPU issue, item 4).

    python -m benchmarks.bench_train_step --shape 1.7b --out OUT/train-step-cuda.md    # on a GPU
    python -m benchmarks.bench_train_step --shape 1.7b --rollout static                 # the same, rollouts uncompiled
    python -m benchmarks.bench_train_step --shape smoke                                # the same code on CPU

A random-weight Qwen3 of the shape (1.7B: hidden 2048, 28 layers, 16/8 heads, V=151936, tied head) is saved with
the lab's tokenizer and trained by the engine's own ``Trainer`` on lab problems with the OPSD recipe's batch (32
prompts, 1024 new tokens; a random model almost never samples EOS, so rollouts run to the cap). Step 1 warms up
(compilation, allocator); step 2 is measured. Phases are timed by wrapping the functions ``Trainer.step`` calls
(CUDA synchronised around each): rollout, teacher scoring, student scoring (forward), loss (fused op forward),
optimizer; ``backward + rest`` is the step's remainder (the backward through the student and the bookkeeping).
Each phase also counts the graphs torch.compile built during it (dynamo's ``unique_graphs``): step 1 compiles
(the decode step, FlexAttention, the block mask), and any graph built in step 2 is a recompile. The rollout engine
and the tree-mask attention that actually ran are named (a compile or FlexAttention failure shows there).
Writes a markdown table (device, versions, command) to ``--out`` when given (after step 1 already, so a timeout
keeps the warm-up's figures), and prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator

import torch

from benchmarks.shapes import QWEN3_1P7B

SHAPES = {
    "1.7b": dict(QWEN3_1P7B, batch=32, new_tokens=1024, micro=4),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=1024, tie_word_embeddings=True,
                  batch=4, new_tokens=16, micro=2),
}  # fmt: skip
PHASES = ("rollout", "teacher", "student", "loss", "optimizer")


def _save_random_model(shape: str, path: str) -> None:
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from atesd.engine.lab import TINY_MODEL_DIR

    spec = {k: v for k, v in SHAPES[shape].items() if k not in ("batch", "new_tokens", "micro")}
    tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    config = Qwen3Config(**spec, max_position_embeddings=4096,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    model.save_pretrained(path)
    tok.save_pretrained(path)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@contextlib.contextmanager
def phase_clock(trainer, graphs: dict[str, int] | None = None) -> Iterator[dict[str, float]]:
    """Inside the block, every ``trainer.step()`` adds the wall seconds of its phases (``PHASES``: the functions
    ``Trainer.step`` calls, wrapped, CUDA synchronised around each) to the yielded clock; clear it between steps.
    The step's remainder (backward through the student, bookkeeping) is its total minus their sum. ``graphs``, when
    given, counts the graphs torch.compile builds in each phase. Everything
    wrapped is restored on exit."""
    import atesd.engine.trainer as trainer_mod

    clock: dict[str, float] = defaultdict(float)

    def timed(name, fn):
        def wrapper(*a, **kw):
            _sync()
            g0, t0 = _graphs(), time.perf_counter()
            print(f"[bench_train_step] {name} ...", file=sys.__stderr__, flush=True)  # a timeout shows where
            out = fn(*a, **kw)
            _sync()
            clock[name] += time.perf_counter() - t0
            if graphs is not None:
                graphs[name] = graphs.get(name, 0) + _graphs() - g0
            print(f"[bench_train_step] {name} done in {time.perf_counter() - t0:.2f} s, {_graphs() - g0} graphs "
                  f"compiled", file=sys.__stderr__, flush=True)
            return out

        return wrapper

    functions = {"teacher": "score_teacher", "student": "score_student", "loss": "distillation_loss"}
    methods = {"rollout": (trainer.rollout, "sample"), "optimizer": (trainer.optimizer, "step")}
    saved = {attr: getattr(trainer_mod, attr) for attr in functions.values()}
    own = {name: vars(obj).get(attr) for name, (obj, attr) in methods.items()}  # instance attributes, if any
    for name, attr in functions.items():
        setattr(trainer_mod, attr, timed(name, saved[attr]))
    for name, (obj, attr) in methods.items():
        setattr(obj, attr, timed(name, getattr(obj, attr)))
    try:
        with warnings.catch_warnings():  # the scheduler warns about a wrapped optimizer.step; it is only timed
            warnings.filterwarnings("ignore", message=".*optimizer.step\\(\\)` has been overridden.*")
            yield clock
    finally:
        for attr, fn in saved.items():
            setattr(trainer_mod, attr, fn)
        for name, (obj, attr) in methods.items():
            if own[name] is None:
                delattr(obj, attr)
            else:
                setattr(obj, attr, own[name])


def log_decode_steps(rollout) -> None:
    """Print the static decoder's decode steps 1, 2, 4, 8, ... and every 128th with the seconds since step 1
    began and the graphs compiled so far, so a timeout inside a rollout says whether compiling or decoding took the
    time (the HF loop has no per-step hook: nothing is printed for it)."""
    step_fn = getattr(rollout, "_step", None)
    if step_fn is None:
        return
    count, start = [0], [0.0]

    def logged(*args, **kwargs):
        if count[0] == 0:
            start[0] = time.perf_counter()
        out = step_fn(*args, **kwargs)
        count[0] += 1
        n = count[0]
        if n & (n - 1) == 0 or n % 128 == 0:
            _sync()
            print(f"[bench_train_step] decode step {n}: {time.perf_counter() - start[0]:.1f} s since step 1 began, "
                  f"{_graphs()} graphs compiled in all", file=sys.__stderr__, flush=True)
        return out

    rollout._step = logged


def measure(shape: str = "smoke", workdir: str | None = None, on_step=None, rollout: str = "auto") -> dict:
    """Per-phase seconds of step 2 (and step 1's total), graphs compiled per phase and step, rollout tokens,
    tokens/s, peak memory, the rollout engine and the attention that ran. ``on_step(partial_result)`` is called
    after each step (step 1's result has no phase split). ``rollout``: the engine's ``--rollout`` (auto: compiled
    on CUDA; static: the same decoder uncompiled, no decode graph to build)."""
    import atesd.engine.train as train_mod
    from atesd.engine.invocation import parse

    s = SHAPES[shape]
    root = workdir or tempfile.mkdtemp(prefix="bench-train-step-")
    model_dir = os.path.join(root, f"qwen3-{shape}-random")
    _save_random_model(shape, model_dir)
    cfg, _ = parse(["--model", model_dir, "--data", "lab", "--batch-size", str(s["batch"]),
                    "--micro-batch", str(s["micro"]), "--max-new-tokens", str(s["new_tokens"]), "--steps", "2",
                    "--eval-problems", "0", "--exposure", "fixed:0.5", "--save-every", "1000",
                    "--output-dir", os.path.join(root, "run"), "--no-progress", "--rollout", rollout])  # fmt: skip
    trainer = train_mod.Trainer(cfg, os.path.join(root, "run"))
    log_decode_steps(trainer.rollout)
    totals = []
    compiled = [{}, {}]  # graphs built per phase, step 1 and step 2
    for i in range(2):
        with phase_clock(trainer, compiled[i]) as clock:
            if i == 1 and torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            _sync()
            g0, t0 = _graphs(), time.perf_counter()
            metrics = trainer.step()
            _sync()
            totals.append(time.perf_counter() - t0)
            compiled[i]["total"] = _graphs() - g0
        if i == 0 and on_step is not None:
            on_step(_result(shape, trainer, totals, None, compiled, metrics, clock))
    phases = {p: clock[p] for p in PHASES}
    phases["backward + rest"] = totals[1] - sum(phases.values())
    return _result(shape, trainer, totals, phases, compiled, metrics, clock)


def _result(shape, trainer, totals, phases, compiled, metrics, clock) -> dict:
    from atesd.engine.scoring import attention_used

    return {
        "shape": shape,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "step1_s": totals[0],
        "step2_s": totals[1] if len(totals) > 1 else None,
        "phases_s": phases,
        "graphs": [dict(c) for c in compiled],
        "rollout_tokens": metrics["rollout_tokens"],
        "rollout_tokens_per_s": metrics["rollout_tokens"] / max(clock["rollout"], 1e-9),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "rollout_impl": f"{type(trainer.rollout).__name__} {getattr(trainer.rollout, 'name', '')}".strip(),
        "attention": f"{attention_used()} (asked: {trainer.attention})",
    }


def render(r: dict, command: str) -> str:
    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = "none"
    graphs = r["graphs"]
    lines = [
        f"### One training step, shape {r['shape']} ({r['device']}, torch {torch.__version__}, triton {triton_v}, "
        f"{time.strftime('%Y-%m-%d')})\n",
        f"`{command}`; rollouts by {r['rollout_impl']}; tree-mask attention {r['attention']}; step 1 (warm-up) "
        f"{r['step1_s']:.2f} s, {graphs[0].get('total', 0)} graphs compiled"
        + (f"; step 2 {r['step2_s']:.2f} s, {graphs[1].get('total', 0)} graphs compiled (any is a recompile)"
           if r["step2_s"] is not None else "; step 2 not reached")
        + f"; {r['rollout_tokens']} rollout tokens, {r['rollout_tokens_per_s']:.0f} rollout tokens/s"
        + (f"; peak memory {r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else "")
        + ".\n",
    ]
    if r["phases_s"] is not None:
        lines += ["| phase | seconds | share | graphs compiled, step 1 | step 2 |", "|---|---|---|---|---|"]
        for name, sec in r["phases_s"].items():
            lines.append(f"| {name} | {sec:.3f} | {sec / r['step2_s']:.0%} | {graphs[0].get(name, '')} | "
                         f"{graphs[1].get(name, '')} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smoke")
    ap.add_argument("--out", default=None, help="markdown file for the table (default: print only)")
    ap.add_argument("--rollout", choices=("auto", "compiled", "static", "hf"), default="auto",
                    help="the engine's rollout decoder (auto: compiled on CUDA, eager static cache on CPU); static "
                         "skips compiling the decode step, so a first step whose compile is slow still gets its "
                         "phase split")
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    command = "python -m benchmarks.bench_train_step " + " ".join(argv if argv is not None else sys.argv[1:])

    def write(result: dict) -> None:
        md = render(result, command)
        print(md, file=sys.__stdout__, flush=True)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as fh:
                fh.write(md)

    with contextlib.redirect_stdout(sys.stderr):  # the trainer's own prints stay out of the table
        result = measure(args.shape, on_step=write, rollout=args.rollout)
    write(result)
    return result


if __name__ == "__main__":
    main()
