"""Answer extraction, normalisation, math-verify equivalence grading in worker processes, pass@k / Average@n.

math-verify's own timeouts use SIGALRM, which only works in a process's main thread, so grading runs in a
``ProcessPoolExecutor`` whose workers call it in their main thread; a wall-clock timeout per answer on the
parent side means a hung parse cannot stall an evaluation (the pool is then torn down and rebuilt), and a cap on
each worker's memory (Linux: ``RLIMIT_DATA``) means a parse that would allocate without bound raises MemoryError
in the worker, graded wrong, instead of exhausting the machine.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import multiprocessing as mp
import re
from collections.abc import Sequence

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def extract_boxed(text: str) -> str | None:
    """Content of the LAST ``\\boxed{...}`` / ``\\fbox{...}`` in ``text`` (brace-matched, nested braces kept).

    ``\\boxed {x}`` (space) is accepted; an unclosed last box or no box gives ``None``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    starts = [m.end() for m in _BOX_RE.finditer(text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text):
            c = text[i]
            if c == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
                i += 2  # escaped brace \{ \} is content, not structure
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i]
            i += 1
    return None


_UNITS = (
    r"(?:degrees?|cm|m|km|kg|g|units?|dollars?|cents?|meters?|inches|feet|hours?|minutes?|seconds?|days?)"
)


def normalize_answer(ans: str) -> str:
    """Light textual normalisation: strips ``$``, ``\\text{}``, ``\\left/\\right``, spacing,
    trailing units/dots, ``\\dfrac``/``\\tfrac`` -> ``\\frac``, ``^\\circ``, thousands separators
    ``1,000`` -> ``1000``."""
    s = ans.strip().strip("$").strip()
    s = re.sub(r"\\text\{\s*" + _UNITS + r"\s*\}", "", s)
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = (
        s.replace("\\left", "")
        .replace("\\right", "")
        .replace("\\!", "")
        .replace("\\,", "")
        .replace("\\ ", "")
    )
    s = re.sub(r"\^\s*\{?\\circ\}?", "", s).replace("°", "")
    s = re.sub(r"\s+" + _UNITS + r"$", "", s)
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
    s = re.sub(r"\s+", " ", s).strip().rstrip(".").strip()
    return s


def _mv_equal(pred: str, gold: str) -> bool:
    """math-verify equivalence of two answers, both parsed as ``$...$`` LaTeX (runs in a worker)."""
    from math_verify import parse, verify

    g = parse(f"${gold}$", parsing_timeout=5)
    p = parse(f"${pred}$", parsing_timeout=5)
    if not g or not p:
        return False
    return bool(verify(g, p, timeout_seconds=5))


def grade(pred: str | None, gold: str) -> bool:
    """True when ``pred`` is equivalent to ``gold``: exact after normalisation, else math-verify (in-process).

    Call from a main thread (math-verify timeouts use signals); :class:`MathGrader` wraps it in workers.
    """
    if pred is None:
        return False
    p, g = normalize_answer(pred), normalize_answer(str(gold))
    if p == g:
        return True
    if not p or not g:
        return False
    try:
        return _mv_equal(p, g)
    except Exception:  # noqa: BLE001 - unparsable answers are simply wrong
        return False


WORKER_MEMORY_MIB = 2048  # data memory a grading worker may add to what it holds when it starts


def _data_bytes() -> int | None:
    """This process's data segment (heap and private anonymous mappings: what RLIMIT_DATA counts), or None
    where /proc does not say (not Linux)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _limit_worker_memory(mib: int) -> None:
    """Pool initializer: cap the worker's data memory at what it holds now + ``mib`` MiB (Linux only; 0: no cap).
    An answer whose parse or simplification would allocate past it raises MemoryError, which ``grade`` counts as
    wrong."""
    used = _data_bytes()
    if not mib or used is None:
        return
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    cap = used + int(mib) * 2**20
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))


def _grade_completion(args: tuple[str, str]) -> bool:
    completion, gold = args
    return grade(extract_boxed(completion), gold)


class MathGrader:
    """Grades completions (last ``\\boxed{}``) against gold answers in worker processes with a timeout.

    ``grader(completion, gold) -> bool`` for one, ``grader.grade_many(completions, golds) -> list[bool]``
    for many. A call that exceeds ``timeout`` seconds counts as wrong and the pool is restarted. Each worker may
    allocate ``memory_mib`` MiB beyond what it holds at start (Linux; 0: no cap): past it the answer is wrong.
    """

    def __init__(self, workers: int = 2, timeout: float = 20.0, start_method: str = "spawn", fn=None,
                 memory_mib: int = WORKER_MEMORY_MIB):
        if workers < 1 or timeout <= 0 or memory_mib < 0:
            raise ValueError(f"need workers >= 1, timeout > 0 and memory_mib >= 0, got {workers}, {timeout}, "
                             f"{memory_mib}")
        self.workers, self.timeout, self.memory_mib = workers, timeout, int(memory_mib)
        self._fn = fn or _grade_completion  # picklable ``(completion, gold) -> bool``; swappable for tests
        self._ctx = mp.get_context(start_method)
        self._pool: cf.ProcessPoolExecutor | None = None

    def _get_pool(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(self.workers, mp_context=self._ctx,
                                                initializer=_limit_worker_memory, initargs=(self.memory_mib,))
        return self._pool

    def _kill_pool(self) -> None:
        if self._pool is not None:
            for p in list(getattr(self._pool, "_processes", {}).values()):
                p.kill()  # only this pool's own workers
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> MathGrader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, completion: str, gold: str) -> bool:
        return self.grade_many([completion], [gold])[0]

    def grade_many(self, completions: Sequence[str], golds: Sequence[str]) -> list[bool]:
        if len(completions) != len(golds):
            raise ValueError(f"{len(completions)} completions but {len(golds)} gold answers")
        out: list[bool | None] = [None] * len(completions)
        # Cheap exact matches need no worker.
        todo = []
        for i, (c, g) in enumerate(zip(completions, golds)):
            pred = extract_boxed(c)
            if pred is None:
                out[i] = False
            elif normalize_answer(pred) == normalize_answer(str(g)):
                out[i] = True
            else:
                todo.append(i)
        while todo:
            pool = self._get_pool()
            futs = {i: pool.submit(self._fn, (completions[i], str(golds[i]))) for i in todo}
            todo = []
            for i, f in futs.items():
                try:
                    out[i] = bool(f.result(timeout=self.timeout))
                except cf.TimeoutError:
                    out[i] = False
                    self._kill_pool()
                    # Resubmit whatever had not finished when the pool died.
                    todo = [j for j in futs if out[j] is None and j != i]
                    break
                except cf.process.BrokenProcessPool:
                    out[i] = False
                    self._kill_pool()
                    todo = [j for j in futs if out[j] is None and j != i]
                    break
        return [bool(x) for x in out]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): ``1 - C(n-c, k) / C(n, k)`` for ``c`` correct of ``n`` samples."""
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def average_at_n(correct: Sequence[Sequence[bool]]) -> float:
    """Average@n: mean over problems of the fraction of their samples that are correct."""
    if not correct:
        raise ValueError("no problems")
    fr = []
    for row in correct:
        if len(row) == 0:
            raise ValueError("a problem with no samples")
        fr.append(sum(bool(x) for x in row) / len(row))
    return sum(fr) / len(fr)


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over problems (each problem's own n = len(row) must be >= k)."""
    if not correct:
        raise ValueError("no problems")
    return sum(pass_at_k(len(r), sum(bool(x) for x in r), k) for r in correct) / len(correct)
