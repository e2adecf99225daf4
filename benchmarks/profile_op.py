"""Per-kernel profile of the fused clipped-KL op (issue 23): which launch of its forward and backward costs what.

    python -m benchmarks.profile_op --out OUT/profile.md          # CUDA: N=8192, H=4096, V=151936, bf16, both heads
    TRITON_INTERPRET=1 python -m benchmarks.profile_op --shape 64x32x300 --out /tmp/profile.md   # CPU dry run

(TRITON_INTERPRET is read when ``kernels/triton_kl.py`` is imported, i.e. when this module is.)

The op's launchers (``kernels/triton_kl.py``: ``forward`` runs ``_stats_kernel`` then, with a finite clip or a JSD,
``_loss_kernel``; ``backward`` runs, by default, the workspace backward: ``_dz_kernel`` per block of rows, then cuBLAS
products; with ATESD_TRITON_BWD_WORKSPACE_MIB=0 the fused ``_bwd_kernel``; ``--backward`` says which of the two this
script profiles, each selected by setting that knob around its calls) are called directly, with the four autotuned
kernels swapped for proxies that time every launch (CUDA events around the launch on a GPU, read after a synchronize;
``perf_counter`` on the CPU, where the interpreter runs synchronously) and keep the compiled kernel it returns. The
proxies change nothing that is launched. What a launcher spends outside its kernels (torch ops merging the
vocabulary splits, zero-filling the fp32 gradient accumulators, casts) is the "torch glue" row.

Rows (medians over ``--rounds`` after one warm-up call that autotunes; written to ``--out`` as measured):
- ``torch.mm hs W^T``: cuBLAS on the same logits shape and dtype, the matmul the op's tiles replace;
- each kernel of the forward, the forward's glue, the forward;
- the workspace backward per head: ``_dz_kernel`` (summed over the blocks of rows), the rest of the backward (the
  cuBLAS products ``dz W`` and, trainable, ``dz^T hs``, with the launcher's glue), the backward, forward + backward;
- the fused backward: ``_bwd_kernel`` per head, the backward's glue, the backward; ``every row masked``: the
  backward with grad = 0, so every tile is filtered and only the logits recomputation and the pointwise math run;
  the difference to the full backward is what ``dz W`` and its atomics cost (and ``dz^T hs`` with its atomics:
  trainable minus frozen);
- the rows path (``kernels/triton_kl_rows.py``, opt-in) per head: its cuBLAS products with fp32 output (the logits
  of both sides, and with a frozen head ``dz1 W`` in the forward; a trainable head's backward forms the logits again),
  ``_rows_fwd_kernel`` and ``_rows_dz_kernel`` (memory-bound: the lines after the table give their bytes per second),
  the launchers, forward + backward;
- ``logits only``: a control kernel in this file that calls the op's own ``_logit_tiles`` with the statistics
  pass's chosen config and keeps one max per row and tile (both sides, then the student side alone): the op's tile
  loop with almost no epilogue. ``_stats_kernel`` minus it is the statistics pass's epilogue.
FLOPs are matmul FLOPs (2 per multiply-add; ``benchmarks/bench_kernels.py``), as multiples of NVH; TFLOP/s and % of
the bf16 matmul peak measured in the same run (torch.mm 8192^3). Per kernel also: the config the autotuner chose
(BLOCK_N x BLOCK_V x BLOCK_K, warps, stages), programs launched and waves (programs / (SMs x resident programs per
SM, estimated from registers, shared memory and threads)), registers and spilled bytes per thread and shared memory
from the compiled kernel, and a static count of its PTX (wgmma, mma.sync, ex2, lg2, global atomics, TMA and
cp.async copies; f32 ALU instructions per logit pair = per element a thread holds of one [BLOCK_N, BLOCK_V] tile).

After the table: the autotuner's timing of every candidate config, a roofline-ish line for the epilogue (exp/log and
f32 instructions per logit pair against the matmul at the measured peak, and the measured difference), an estimate
of how many backward tiles the gradient filter skips at these inputs (the kernel's test replayed on the host for the
first token tile), and the device kernels torch.profiler saw in one forward + backward (aten ops on the CPU).

On the CPU (Triton's interpreter) the timings mean nothing and there is no compiled code; the run exists so that
CI dry-runs every line of this script (``benchmarks/gpu_session.sh``, step c-profile). Inputs are those of
``bench_kernels.py`` (the same distribution, so the gradient filter sees the same data).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import triton
import triton.language as tl

from atesd.kernels import triton_kl, triton_kl_rows
from atesd.kernels.triton_kl import _logit_tiles, _tile_ids

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
KERNELS = ("_stats_kernel", "_loss_kernel", "_bwd_kernel", "_dz_kernel")
BACKWARDS = ("workspace", "fused", "rows")  # ATESD_TRITON_BWD_WORKSPACE_MIB: the default (512), 0; the rows path
ROW_KERNELS = ("_rows_fwd_kernel", "_rows_dz_kernel")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
H200 = dict(sms=132, clock_mhz=1980)  # assumed where no GPU answers (datasheet maximum SM clock)
MUFU_PER_CLK_SM = 16  # exp2 / log2 results per clock per SM (CUDA guide, compute capability 9.0)
FP32_PER_CLK_SM = 128  # f32 add / mul / fma lanes per clock per SM
PTX_COUNTS = {
    "wgmma": r"\bwgmma\.mma_async",
    "mma.sync": r"\bmma\.sync",
    "ex2": r"\bex2\.approx",
    "lg2": r"\blg2\.approx",
    "atomics": r"\b(?:red|atom)\.global",
    "TMA": r"\bcp\.async\.bulk\.tensor",
    "cp.async": r"\bcp\.async\.c[ag]\b",
}
_F32_ALU = re.compile(  # an f32 arithmetic instruction (opcode with .f32), after an optional predicate
    r"^\s*(?:@!?%p\w*\s+)?(?:add|sub|mul|fma|max|min|neg|abs|setp|selp|ex2|lg2|rcp|div)(?:\.\w+)*\.f32\b", re.M)


@triton.jit
def _logits_only_kernel(hs_ptr, ht_ptr, w_ptr, out_ptr, N, V, H, HT, n_splits, split_len, inv_t,
                        SHARED_W: tl.constexpr, DOT_PREC: tl.constexpr, GROUP_N: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """Control: the op's grid, program order and tile loop (``_logit_tiles``) with a one-op epilogue (a max
    per row and tile, so the dots are not dead code). SHARED_W: both sides off one W tile (as the op); else
    HT = 0 leaves the student side alone."""
    pid_n, pid_s = _tile_ids(N, n_splits, split_len, BLOCK_N, GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    v_lo = pid_s * split_len
    v_hi = tl.minimum(v_lo + split_len, V)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        zs, zt = _logit_tiles(hs_ptr, ht_ptr, w_ptr, w_ptr, hs_ptr, hs_ptr, rows, cols, N, V, H, HT, inv_t,
                              False, False, SHARED_W, DOT_PREC, DOT_PREC, BLOCK_N, BLOCK_V, BLOCK_K)
        acc = tl.maximum(acc, tl.max(zs, 1))
        if SHARED_W:
            acc = tl.maximum(acc, tl.max(zt, 1))
    tl.store(out_ptr + rows.to(tl.int64) * n_splits + pid_s, acc, mask=rows < N)


# ------------------------------------------------------------------------------------------------------- timing
class Timeline:
    """Named spans of one round: CUDA events on a GPU (read after a synchronize), perf_counter on the CPU."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object, object]] = []

    @staticmethod
    def _mark():
        if CUDA:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @contextlib.contextmanager
    def span(self, name: str):
        start = self._mark()
        try:
            yield
        finally:
            self.spans.append((name, start, self._mark()))

    def read(self) -> dict[str, float]:
        """name -> milliseconds this round (summed over the name's spans); clears the spans."""
        if CUDA:
            torch.cuda.synchronize()
        out: dict[str, float] = defaultdict(float)
        for name, start, end in self.spans:
            out[name] += start.elapsed_time(end) if CUDA else (end - start) * 1e3
        self.spans = []
        return out


class TimedKernel:
    """Stands in for one of triton_kl's autotuned kernels: launches it unchanged inside a span of the timeline, and
    keeps the grid and the compiled kernel of the last launch (None in the interpreter)."""

    def __init__(self, name: str, kernel, timeline: Timeline) -> None:
        self.name, self.kernel, self.timeline = name, kernel, timeline
        self.grid = None
        self.compiled = None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            with self.timeline.span(self.name):
                compiled = self.kernel[grid](*args, **kwargs)
            self.grid, self.compiled = grid, compiled if compiled is not None else self.compiled
            return compiled

        return launch


@contextlib.contextmanager
def timed_kernels(timeline: Timeline):
    """triton_kl's kernels swapped for :class:`TimedKernel` proxies (the launchers look them up at each call)."""
    proxies = {name: TimedKernel(name, getattr(triton_kl, name), timeline) for name in KERNELS}
    for name, proxy in proxies.items():
        setattr(triton_kl, name, proxy)
    try:
        yield proxies
    finally:
        for name, proxy in proxies.items():
            setattr(triton_kl, name, proxy.kernel)


@contextlib.contextmanager
def backward_path(path: str):
    """ATESD_TRITON_BWD_WORKSPACE_MIB set for ``path``: "fused" = 0; "workspace" = as the environment has it, or the
    default (512) where it is unset or 0. Restored afterwards."""
    old = os.environ.get("ATESD_TRITON_BWD_WORKSPACE_MIB")
    if path == "fused":
        os.environ["ATESD_TRITON_BWD_WORKSPACE_MIB"] = "0"
    elif old is None or triton_kl.workspace_mib() <= 0:
        os.environ["ATESD_TRITON_BWD_WORKSPACE_MIB"] = triton_kl._DEFAULT_WORKSPACE_MIB
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ATESD_TRITON_BWD_WORKSPACE_MIB", None)
        else:
            os.environ["ATESD_TRITON_BWD_WORKSPACE_MIB"] = old


@contextlib.contextmanager
def timed_rows(timeline: Timeline, phase: list[str]):
    """triton_kl_rows' two kernels swapped for proxies, and its fp32-output products timed as "mm <phase[0]>"."""
    proxies = {name: TimedKernel(name, getattr(triton_kl_rows, name), timeline) for name in ROW_KERNELS}
    real_mm = triton_kl_rows._mm_fp32

    def mm(a, b, out):
        with timeline.span(f"mm {phase[0]}"):
            real_mm(a, b, out)

    for name, proxy in proxies.items():
        setattr(triton_kl_rows, name, proxy)
    triton_kl_rows._mm_fp32 = mm
    old = os.environ.get("ATESD_TRITON_ROWS_MIB")
    if triton_kl_rows.rows_mib() <= 0:
        os.environ["ATESD_TRITON_ROWS_MIB"] = str(triton_kl_rows._DIRECT_MIB)
    try:
        yield proxies
    finally:
        for name, proxy in proxies.items():
            setattr(triton_kl_rows, name, proxy.kernel)
        triton_kl_rows._mm_fp32 = real_mm
        if old is None:
            os.environ.pop("ATESD_TRITON_ROWS_MIB", None)
        else:
            os.environ["ATESD_TRITON_ROWS_MIB"] = old


def medians(timeline: Timeline, call, rounds: int) -> dict[str, float]:
    """One warm-up ``call()`` (autotuning, compiles), then ``rounds`` timed ones: name -> median ms."""
    call()
    timeline.read()
    runs = []
    for _ in range(rounds):
        call()
        runs.append(timeline.read())
    return {name: statistics.median(r[name] for r in runs) for name in runs[0]}


# ------------------------------------------------------------------------------------------------ the device
def device_figures() -> dict:
    """SMs, max SM clock (MHz) and per-SM limits; H200 figures, marked assumed, where no GPU answers."""
    if not CUDA:
        return dict(H200, regs=65536, smem=233472, threads=2048, what="H200 figures assumed (no GPU)")
    p = torch.cuda.get_device_properties(DEVICE)
    clock, what = H200["clock_mhz"], f"{p.name}, {p.multi_processor_count} SMs"
    if shutil.which("nvidia-smi"):
        try:
            res = subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits",
                                  "-i", str(DEVICE.index or 0)], capture_output=True, text=True, timeout=20)
            clock = int(res.stdout.split()[0])
            what += f", max SM clock {clock} MHz (nvidia-smi)"
        except (ValueError, IndexError, subprocess.SubprocessError):
            what += f", max SM clock {clock} MHz assumed (nvidia-smi did not say)"
    else:
        what += f", max SM clock {clock} MHz assumed (no nvidia-smi)"
    return dict(sms=p.multi_processor_count, clock_mhz=clock, what=what,
                regs=getattr(p, "regs_per_multiprocessor", 65536),
                smem=getattr(p, "shared_memory_per_multiprocessor", 233472),
                threads=getattr(p, "max_threads_per_multi_processor", 2048))


def compiled_facts(compiled, warps: int, elems_per_thread: float, dev: dict) -> dict:
    """Registers, spills, shared memory, resident programs per SM (estimate) and the PTX counts of a compiled
    kernel; empty in the interpreter."""
    if compiled is None:
        return {}
    regs, spills = getattr(compiled, "n_regs", None), getattr(compiled, "n_spills", None)
    smem = getattr(getattr(compiled, "metadata", None), "shared", None)
    facts = dict(regs=regs, spills=spills, smem=smem)
    threads = 32 * warps
    limits = [dev["threads"] // threads]
    if regs:
        limits.append(dev["regs"] // (math.ceil(regs / 8) * 8 * threads))
    if smem:
        limits.append(dev["smem"] // (smem + 1024))  # 1 KiB the driver reserves per block
    facts["resident"] = max(0, min(limits))
    try:
        ptx = compiled.asm["ptx"]
    except (AttributeError, KeyError, TypeError):
        return facts
    facts["ptx"] = {name: len(re.findall(pattern, ptx)) for name, pattern in PTX_COUNTS.items()}
    facts["f32_per_pair"] = len(_F32_ALU.findall(ptx)) / elems_per_thread
    facts["mufu_per_pair"] = (facts["ptx"]["ex2"] + facts["ptx"]["lg2"]) / elems_per_thread
    return facts


# ------------------------------------------------------------------------------------------------- the report
COLUMNS = ("part", "head", "ms", "matmul FLOPs", "TFLOP/s", "% of matmul peak", "config (N x V x K, warps, stages)",
           "programs (waves)", "regs", "spills B", "smem KiB", "PTX: wgmma / mma.sync / ex2 / lg2 / atomics / TMA / "
           "cp.async", "f32 ops per logit pair")


class Report:
    """Markdown written as it is measured: each line appended to ``path`` (and printed) at once."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def line(self, text: str = "") -> None:
        print(text, flush=True)
        if self.path:
            with open(self.path, "a") as fh:
                fh.write(text + "\n")


class Profile:
    """The measurements of one shape, written to a :class:`Report` row by row."""

    def __init__(self, args, report: Report) -> None:
        from benchmarks.bench_kernels import matmul_peak_tflops

        self.args, self.report = args, report
        self.n, self.h, self.v = args.shape
        self.dtype = DTYPES[args.dtype]
        self.dev = device_figures()
        self.peak, self.peak_what = matmul_peak_tflops()
        g = torch.Generator(device=DEVICE).manual_seed(0)  # bench_kernels.inputs' distribution
        self.hs = (torch.randn(self.n, self.h, device=DEVICE, generator=g) * 2).to(self.dtype)
        self.ht = (self.hs.float() + torch.randn(self.n, self.h, device=DEVICE, generator=g)).to(self.dtype)
        self.w = (torch.randn(self.v, self.h, device=DEVICE, generator=g) / self.h**0.5).to(self.dtype)
        self.grad = torch.full((self.n,), 1.0 / self.n, device=DEVICE)  # a mean over the rows
        self.n_splits, self.split_len = triton_kl._splits(self.n, self.v, DEVICE)
        self.timeline = Timeline()
        self.ms: dict[tuple[str, str], float] = {}  # (part, head) -> ms, for the difference rows and lines below
        self.facts: dict[str, dict] = {}  # kernel name -> config and compiled facts
        self.saved = None  # lse_s, lse_t, g of the forward
        self.rows_facts: dict[str, tuple] = {}  # rows path kernel + head -> (config, ms, rows per block)

    # ----------------------------------------------------------------------------------------- rows
    def header(self, command: str) -> None:
        a, r = self.args, self.report
        eps = triton_kl.filter_eps(self.dtype)
        r.line(f"# Per-kernel profile of the fused clipped-KL op ({'CUDA' if CUDA else 'CPU, Triton interpreter'})")
        r.line()
        r.line(f"device: {self.dev['what']}; torch {torch.__version__}; triton {triton.__version__}; "
               f"date {time.strftime('%Y-%m-%d %H:%M')}")
        r.line(f"N={self.n}, H={self.h}, V={self.v}, {a.dtype}, T {a.temperature}, clip {a.clip}, beta {a.beta}; "
               f"{self.n_splits} vocab splits of {self.split_len}; gradient filter eps {eps:.3g} per row "
               f"({eps / self.n_splits:.3g} per split); medians of {a.rounds} rounds after a warm-up")
        with backward_path("workspace"):
            rows, mib = triton_kl.workspace_rows(self.n, self.v, self.dtype), triton_kl.workspace_mib()
        r.line(f"workspace backward: blocks of {rows} rows (ATESD_TRITON_BWD_WORKSPACE_MIB {mib:g}); "
               f"matmul peak ({self.peak_what}): {self.peak:.3g} TFLOP/s; command: `{command}`")
        r.line()
        r.line("| " + " | ".join(COLUMNS) + " |")
        r.line("|" + "---|" * len(COLUMNS))

    def row(self, part: str, head: str, ms: float, nvh: float | None, kernel: str | None = None) -> None:
        """One table row; ``nvh``: matmul FLOPs / (N V H); ``kernel``: a key of self.facts for its config cells."""
        self.ms[(part, head)] = ms
        cells = [part, head, f"{ms:.3g}"]
        if nvh is None:
            cells += ["", "", ""]
        elif ms <= 0:  # a difference of two medians within their noise
            cells += [f"{nvh:g}NVH", "-", "-"]
        else:
            tf = nvh * self.n * self.v * self.h / (ms * 1e-3) / 1e12
            cells += [f"{nvh:g}NVH", f"{tf:.3g}", f"{100 * tf / self.peak:.0f}%"]
        f = self.facts.get(kernel, {}) if kernel else {}
        ptx = f.get("ptx")
        resident = f.get("resident")
        waves = f"{f['programs'] / (self.dev['sms'] * resident):.2f} at {resident}/SM" if resident else "-"
        cells += [
            f.get("config", ""),
            f"{f['programs']} ({waves})" if "programs" in f else "",
            _cell(f.get("regs"), kernel), _cell(f.get("spills"), kernel),
            _cell(None if f.get("smem") is None else f"{f['smem'] / 1024:.0f}", kernel),
            " / ".join(str(ptx[k]) for k in PTX_COUNTS) if ptx else _cell(None, kernel),
            f"{f['f32_per_pair']:.0f} (+{f['mufu_per_pair']:.1f} MUFU)" if "f32_per_pair" in f else _cell(None, kernel),
        ]
        self.report.line("| " + " | ".join(cells) + " |")

    def remember(self, name: str, proxy: TimedKernel) -> None:
        """The config the autotuner chose for ``proxy``'s kernel and what its compiled kernel says (once per name:
        the autotuner keeps only its last benchmark's timings, which a later cached call would misattribute)."""
        if name in self.facts:
            return
        cfg = proxy.kernel.best_config
        kw = cfg.kwargs
        programs = proxy.grid(kw)[0] if callable(proxy.grid) else proxy.grid[0]
        per_thread = kw["BLOCK_N"] * kw["BLOCK_V"] / (32 * cfg.num_warps)
        self.facts[name] = dict(config=f"{kw['BLOCK_N']}x{kw['BLOCK_V']}x{kw['BLOCK_K']}, {cfg.num_warps}, "
                                       f"{cfg.num_stages}", cfg=cfg, programs=programs,
                                timings=getattr(proxy.kernel, "configs_timings", None),
                                **compiled_facts(proxy.compiled, cfg.num_warps, per_thread, self.dev))

    def matmul_row(self) -> None:
        wt = self.w.t()
        mm = medians(self.timeline, lambda: self._span("mm", lambda: torch.mm(self.hs, wt)), self.args.rounds)
        self.row("torch.mm hs W^T (same logits shape)", "", mm["mm"], 2)

    def _span(self, name, fn):
        with self.timeline.span(name):
            return fn()

    def forward_rows(self) -> None:
        a = self.args

        def call():
            with self.timeline.span("forward"):
                out = triton_kl.forward(self.hs, self.ht, self.w, None, None, None, a.temperature, a.clip, a.beta)
            self.saved = out[2], out[3], out[4]

        with timed_kernels(self.timeline) as proxies:
            ms = medians(self.timeline, call, a.rounds)
        kernel_ms = 0.0
        for name in KERNELS[:2]:
            if name in ms:
                self.remember(name, proxies[name])
                self.row(name, "", ms[name], 4, name)
                kernel_ms += ms[name]
        self.row("forward torch glue (split merge)", "", ms["forward"] - kernel_ms, None)
        self.row("forward (launcher)", "", ms["forward"], 4 * sum(name in ms for name in KERNELS[:2]))

    def backward_rows(self, head: str, path: str = "fused", masked: bool = False) -> None:
        a = self.args
        need_w = head == "trainable"
        grad = torch.zeros_like(self.grad) if masked else self.grad

        def call():
            with self.timeline.span("backward"):
                triton_kl.backward(grad, self.hs, self.ht, self.w, None, None, None, *self.saved, a.temperature,
                                   a.clip, a.beta, need_w, False)

        with backward_path(path), timed_kernels(self.timeline) as proxies:
            ms = medians(self.timeline, call, a.rounds)
        nvh = 6 + 2 * need_w
        if path == "workspace":
            key = f"_dz_kernel {head}"
            self.remember(key, proxies["_dz_kernel"])
            self.row("_dz_kernel (workspace backward)", head, ms["_dz_kernel"], 4, key)
            products = "dz W, dz^T hs" if need_w else "dz W"
            self.row(f"cuBLAS {products} + glue (workspace backward - _dz_kernel)", head,
                     ms["backward"] - ms["_dz_kernel"], 2 + 2 * need_w)
            self.row("backward, workspace (launcher)", head, ms["backward"], nvh)
            self.row("forward + backward, workspace (launchers)", head,
                     self.ms[("forward (launcher)", "")] + ms["backward"], self.op_nvh(need_w))
            return
        key = f"_bwd_kernel {head}"
        self.remember(key, proxies["_bwd_kernel"])
        if masked:
            self.row("_bwd_kernel, every row masked (recompute + pointwise; every tile filtered)", head,
                     ms["_bwd_kernel"], 4, key)
            full = self.ms.get(("_bwd_kernel", head))
            if full is not None:
                what = "dz W, dz^T hs + their atomics" if need_w else "dz W + its atomics"
                self.row(f"{what} (_bwd_kernel - masked)", head, full - ms["_bwd_kernel"], 2 + 2 * need_w)
            return
        self.row("_bwd_kernel", head, ms["_bwd_kernel"], nvh, key)
        self.row("backward torch glue (zero-fill, casts)", head, ms["backward"] - ms["_bwd_kernel"], None)
        self.row("backward, fused (launcher)", head, ms["backward"], nvh)
        frozen = self.ms.get(("_bwd_kernel", "frozen"))
        if need_w and frozen is not None:
            self.row("dz^T hs + its atomics (trainable - frozen _bwd_kernel)", head, ms["_bwd_kernel"] - frozen, 2)
        self.row("forward + backward, fused (launchers)", head, self.ms[("forward (launcher)", "")] + ms["backward"],
                 self.op_nvh(need_w))

    def rows_path_rows(self, head: str) -> None:
        """The opt-in rows path (kernels/triton_kl_rows.py): its fp32-output cuBLAS products, each pointwise kernel,
        the launchers; a frozen head's backward is linear_kl.py's per-row scale of gh1 (timed here as the same ops)."""
        a, frozen, phase = self.args, head == "frozen", ["fwd"]

        def call():
            phase[0] = "fwd"
            with self.timeline.span("rows forward"):
                out = triton_kl_rows.forward(self.hs, self.ht, self.w, None, None, None, a.temperature, a.clip, a.beta,
                                             want_grad_hs=frozen)
            phase[0] = "bwd"
            with self.timeline.span("rows backward"):
                if frozen:
                    g = self.grad[:, None]
                    torch.where(g != 0, out[8] * g, torch.zeros((), device=DEVICE)).to(self.dtype)
                else:
                    triton_kl_rows.backward(self.grad, self.hs, self.ht, self.w, None, None, None, out[2], out[3],
                                            out[4], a.temperature, a.clip, a.beta, True, False)

        with timed_rows(self.timeline, phase) as proxies:
            rows = triton_kl_rows.block_rows(self.n, self.v, self.dtype)
            ms = medians(self.timeline, call, a.rounds)
        for name, proxy in proxies.items():
            if name in ms:
                cfg = proxy.kernel.best_config
                config = f"BLOCK_R {cfg.kwargs['BLOCK_R']}, BLOCK_V {cfg.kwargs['BLOCK_V']}, {cfg.num_warps} warps"
                self.rows_facts[f"{name} {head}"] = (config, ms[name], rows)
        products = "logits, dz1 W" if frozen else "logits"
        self.row(f"rows path: cuBLAS fp32-out {products} (forward)", head, ms["mm fwd"], 6 if frozen else 4)
        passes = "3 passes, dz1 written" if frozen else "2 passes"
        self.row(f"rows path: _rows_fwd_kernel ({passes})", head, ms["_rows_fwd_kernel"], None)
        self.row("rows path: forward (launcher)", head, ms["rows forward"], 6 if frozen else 4)
        if frozen:
            self.row("rows path: backward = per-row scale of gh1 (linear_kl.py)", head, ms["rows backward"], None)
        else:
            self.row("rows path: cuBLAS fp32-out logits again (backward)", head, ms["mm bwd"], 4)
            self.row("rows path: _rows_dz_kernel", head, ms["_rows_dz_kernel"], None)
            self.row("rows path: cuBLAS dz W, dz^T hs + glue (backward - logits - _rows_dz_kernel)", head,
                     ms["rows backward"] - ms["mm bwd"] - ms["_rows_dz_kernel"], 4)
            self.row("rows path: backward (launcher)", head, ms["rows backward"], 8)
        self.row("rows path: forward + backward", head, ms["rows forward"] + ms["rows backward"],
                 6 if frozen else 12)

    def rows_lines(self) -> None:
        """The rows path's pointwise kernels: config, and bytes moved per second (8 B per logit pair read per pass,
        2 B of dz written)."""
        if not self.rows_facts:
            return
        self.report.line()
        for key, (config, ms, rows) in self.rows_facts.items():
            name, head = key.split()
            passes = 1 if name == "_rows_dz_kernel" else 3 if head == "frozen" else 2
            nbytes = self.n * self.v * (8 * passes + 2 * (name == "_rows_dz_kernel" or head == "frozen"))
            self.report.line(f"- rows path, {key}: {config}; blocks of {rows} rows; {passes} pass(es), "
                             f"{nbytes / 1e9:.3g} GB at {nbytes / (ms * 1e-3) / 1e9:.3g} GB/s")

    def op_nvh(self, need_w: bool) -> int:
        second_pass = math.isfinite(self.args.clip) or 0.0 < self.args.beta < 1.0
        return 4 * (1 + second_pass) + 6 + 2 * need_w

    def control_rows(self) -> None:
        """The logits-only control kernel on the statistics pass's chosen config: both sides, then the student's."""
        for both in (True, False):
            self.control_row(both)

    def control_row(self, both: bool) -> None:
        cfg = self.facts["_stats_kernel"]["cfg"]
        kw = cfg.kwargs
        prec = "ieee" if self.dtype == torch.float32 and os.environ.get("ATESD_TRITON_TF32", "0") != "1" else "tf32"
        out = torch.empty((self.n, self.n_splits), device=DEVICE, dtype=torch.float32)
        grid = (triton.cdiv(self.n, kw["BLOCK_N"]) * self.n_splits,)
        compiled = []

        def call():
            with self.timeline.span("logits"):
                k = _logits_only_kernel[grid](
                    self.hs, self.ht, self.w, out, self.n, self.v, self.h, self.h if both else 0, self.n_splits,
                    self.split_len, 1.0 / self.args.temperature, SHARED_W=both, DOT_PREC=prec,
                    GROUP_N=triton_kl._GROUP_N, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **kw)
            compiled[:] = [k]

        ms = medians(self.timeline, call, self.args.rounds)
        key = f"logits {'both' if both else 'student'}"
        per_thread = kw["BLOCK_N"] * kw["BLOCK_V"] / (32 * cfg.num_warps)
        self.facts[key] = dict(config=self.facts["_stats_kernel"]["config"], programs=grid[0],
                               **compiled_facts(compiled[0], cfg.num_warps, per_thread, self.dev))
        self.row(f"logits only, {'both sides' if both else 'student side'} (control kernel, the stats config)", "",
                 ms["logits"], 4 if both else 2, key)

    # ------------------------------------------------------------------------------------ the lines after
    def autotune_lines(self) -> None:
        r = self.report
        r.line()
        r.line("Autotuning (each candidate config's time in ms, as the autotuner measured it; * = chosen):")
        for name, f in self.facts.items():
            timings = f.get("timings")
            if not name.startswith("_") or not timings:
                continue
            best = f["cfg"]
            parts = []
            for cfg, t in sorted(timings.items(), key=lambda item: _first(item[1])):
                kw = cfg.kwargs
                mark = "*" if cfg is best or str(cfg) == str(best) else ""
                parts.append(f"{kw['BLOCK_N']}x{kw['BLOCK_V']}x{kw['BLOCK_K']}/{cfg.num_warps}/{cfg.num_stages}"
                             f"{mark} {_first(t):.3g}")
            r.line(f"- {name}: " + "; ".join(parts))
        if not any(name.startswith("_") and f.get("timings") for name, f in self.facts.items()):
            r.line("- none recorded (one config per kernel: the interpreter, or ATESD_TRITON_CONFIG)")

    def epilogue_lines(self) -> None:
        """Exp/log and f32 work per logit pair against the matmul, per pass; and the measured epilogue."""
        r, dev = self.report, self.dev
        pairs = self.n * self.v
        jsd = 0.0 < self.args.beta < 1.0
        clk = dev["sms"] * dev["clock_mhz"] * 1e6
        mm_ms = 4 * pairs * self.h / (self.peak * 1e12) * 1e3
        r.line()
        r.line(f"Epilogue vs matmul, per pass over the {self.n} x {self.v} logit pairs (both sides): the matmul at the "
               f"measured peak takes {mm_ms:.3g} ms. Exp/log are MUFU work ({MUFU_PER_CLK_SM}/clk/SM), the rest f32 "
               f"ALU ({FP32_PER_CLK_SM} lanes/clk/SM); {dev['sms']} SMs at {dev['clock_mhz']} MHz. Triton runs each "
               "tile's epilogue after its K loop, not overlapped with the MMAs, so these add up:")
        # from the source: _stats_kernel 2 exp per pair; _pointwise 2 exp, + exp and log in the JSD log-mix
        source = {"_stats_kernel": 2, "_loss_kernel": 2 + 2 * jsd, "_bwd_kernel frozen": 2 + 2 * jsd}
        for name, f in self.facts.items():
            if not name.startswith("_"):
                continue
            counted = "f32_per_pair" in f  # static PTX counts of the compiled kernel; else exp/log from the source
            mufu = f["mufu_per_pair"] if counted else source.get(name, source["_bwd_kernel frozen"])
            mufu_ms = pairs * mufu / (MUFU_PER_CLK_SM * clk) * 1e3
            where = "PTX" if counted else "source, at most"
            text = f"- {name}: {mufu:.2g} exp/log per pair ({where}) -> {mufu_ms:.2g} ms ({100 * mufu_ms / mm_ms:.1f}%)"
            if counted:
                alu_ms = pairs * f["f32_per_pair"] / (FP32_PER_CLK_SM * clk) * 1e3
                text += (f"; {f['f32_per_pair']:.0f} f32 instructions per pair (PTX) -> {alu_ms:.2g} ms "
                         f"({100 * alu_ms / mm_ms:.0f}%)")
            else:
                text += "; f32 instructions: no compiled code (interpreter)"
            r.line(text)
        both = self.ms.get(("logits only, both sides (control kernel, the stats config)", ""))
        for name in ("_stats_kernel", "_loss_kernel"):
            ms = self.ms.get((name, ""))
            if both is not None and ms is not None:
                r.line(f"- measured: {name} - logits-only control = {ms - both:.3g} ms "
                       f"({100 * (ms - both) / ms:.0f}% of {name}); the control itself is {both:.3g} ms, "
                       f"{100 * mm_ms / both:.0f}% of the matmul peak")

    def filter_line(self) -> None:
        """How many backward tiles the gradient filter would skip: the kernel's test replayed on the host (fp32)
        for the first token tile of the frozen backward's config, every split."""
        f = self.facts.get("_bwd_kernel frozen") or next((v for k, v in self.facts.items() if "_bwd" in k), None)
        if f is None or self.saved is None:
            return
        from atesd.kernels.reference import pointwise_divergence

        a = self.args
        bn, bv = f["cfg"].kwargs["BLOCK_N"], f["cfg"].kwargs["BLOCK_V"]
        rows = slice(0, min(bn, self.n))
        w = self.w.float().t()
        zs = (self.hs[rows].float() @ w / a.temperature).requires_grad_(True)
        zt = self.ht[rows].float() @ w / a.temperature
        lv = pointwise_divergence(torch.log_softmax(zs, 1), torch.log_softmax(zt, 1), a.beta)
        clipped = torch.where(lv > a.clip, torch.full_like(lv, a.clip), lv) if math.isfinite(a.clip) else lv
        (dzu,) = torch.autograd.grad(clipped.sum(), zs)  # = c gp - ps g per logit: the kernel's dzu
        mass = dzu.abs()
        budget = triton_kl.filter_eps(self.dtype) / self.n_splits
        skipped = tiles = 0
        for lo in range(0, self.v, self.split_len):
            spent = torch.zeros(mass.shape[0], device=DEVICE)
            for v0 in range(lo, min(lo + self.split_len, self.v), bv):
                new = spent + mass[:, v0:v0 + bv].sum(1)
                skip = bool((new <= budget).all())  # a NaN row is never skipped
                skipped, tiles = skipped + skip, tiles + 1
                spent = new if skip else spent
        self.report.line()
        self.report.line(f"Gradient filter at these inputs (the kernel's test replayed in fp32 on rows "
                         f"0-{rows.stop - 1}, BLOCK_V {bv}, budget {budget:.3g} per split): {skipped} of {tiles} "
                         f"vocab tiles skipped ({100 * skipped / tiles:.0f}%); the backward rows' FLOPs count "
                         "every tile as done.")

    def profiler_lines(self) -> None:
        """The kernels (CUDA) or aten ops (CPU) torch.profiler sees in one forward + backward per head (the backward
        the first of ``--backward`` names)."""
        from torch.profiler import ProfilerActivity, profile

        a = self.args
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
        with backward_path(a.backward[0]), profile(activities=activities) as prof:
            out = triton_kl.forward(self.hs, self.ht, self.w, None, None, None, a.temperature, a.clip, a.beta)
            for head in a.heads:
                triton_kl.backward(self.grad, self.hs, self.ht, self.w, None, None, None, out[2], out[3], out[4],
                                   a.temperature, a.clip, a.beta, head == "trainable", False)
            if CUDA:
                torch.cuda.synchronize()
        attr = "self_device_time_total" if CUDA else "self_cpu_time_total"
        events = sorted(prof.key_averages(), key=lambda e: getattr(e, attr, 0.0), reverse=True)
        events = [e for e in events if getattr(e, attr, 0.0) > 0][:12]
        r = self.report
        r.line()
        r.line(f"torch.profiler, one forward + {a.backward[0]} backward ({', '.join(a.heads)}), by "
               f"{'device' if CUDA else 'CPU (aten ops; interpreted kernels are not ops)'} time:")
        r.line()
        r.line("| name | calls | ms |")
        r.line("|---|---|---|")
        for e in events:
            r.line(f"| {e.key[:90].replace('|', '/')} | {e.count} | {getattr(e, attr) / 1e3:.3g} |")


def _cell(value, kernel) -> str:
    if value is not None:
        return str(value)
    return "n/a (interpreter)" if kernel and not CUDA else ""


def _first(t) -> float:
    """The autotuner's timing of a config: a float, or [median, quantiles...]."""
    return float(t[0] if isinstance(t, (list, tuple)) else t)


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        n, h, v = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be NxHxV (three integers), got {text!r}") from None
    if min(n, h, v) < 1:
        raise argparse.ArgumentTypeError(f"shape must be positive, got {text!r}")
    return n, h, v


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=parse_shape, default="8192x4096x151936" if CUDA else "64x32x300",
                    help="NxHxV (default: the Qwen3-8B head at 8192 tokens on CUDA, 64x32x300 on the CPU)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--heads", default="frozen,trainable", help="comma-separated: frozen, trainable")
    ap.add_argument("--temperature", type=float, default=1.1)
    ap.add_argument("--clip", type=float, default=0.06, help="inf: no clipping (no second forward pass)")
    ap.add_argument("--beta", type=float, default=0.0)
    ap.add_argument("--backward", default=",".join(BACKWARDS),
                    help="comma-separated: workspace (the default backward), fused (ATESD_TRITON_BWD_WORKSPACE_MIB=0), "
                    "rows (the opt-in rows path, forward and backward: ATESD_TRITON_ROWS_MIB, 512 unless set)")
    ap.add_argument("--rounds", type=int, default=5 if CUDA else 1)
    ap.add_argument("--no-profiler", action="store_true", help="skip the torch.profiler table")
    ap.add_argument("--out", default=None, help="markdown file, written as measured (default: print only)")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    args.heads = args.heads.split(",")
    if set(args.heads) - {"frozen", "trainable"} or not args.heads:
        ap.error(f"--heads takes frozen and/or trainable, got {','.join(args.heads)!r}")
    args.backward = args.backward.split(",")
    if set(args.backward) - set(BACKWARDS) or not args.backward:
        ap.error(f"--backward takes workspace, fused and/or rows, got {','.join(args.backward)!r}")
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("no CUDA device: set TRITON_INTERPRET=1 to run the Triton kernels in the interpreter (a dry run)")
    report = Report(args.out)
    prof = Profile(args, report)
    prof.header("python -m benchmarks.profile_op " + " ".join(argv if argv is not None else sys.argv[1:]))
    prof.matmul_row()
    prof.forward_rows()
    for path in BACKWARDS:
        if path in args.backward:
            for head in ("frozen", "trainable"):
                if head in args.heads:
                    prof.rows_path_rows(head) if path == "rows" else prof.backward_rows(head, path)
    if "fused" in args.backward:
        prof.backward_rows(args.heads[0], "fused", masked=True)
    prof.control_rows()
    prof.autotune_lines()
    prof.epilogue_lines()
    prof.filter_line()
    prof.rows_lines()
    if not args.no_profiler:
        prof.profiler_lines()


if __name__ == "__main__":
    main()
