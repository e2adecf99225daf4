"""The main job on a busy CPU: wall time idle and under a competing load, torch's default threads vs one thread vs
the engine's choice (engine/threads.py).

    python -m benchmarks.bench_busy [--steps 60] [--load 2] [--out table.md]
    python -m benchmarks.bench_busy --policies --steps 20 --eval-problems 100   # OpenMP wait policies at 2 threads
    pytest benchmarks/bench_busy.py --benchmark -s

Each cell is one `python -m engine.train` process (the embedded default; `--steps` shortens it, `--eval-problems`
too), timed from start to exit:

- default: what torch does left alone: one thread per core, OpenMP's default wait policy (threads waiting for their
  siblings spin; ``OMP_WAIT_POLICY`` set empty, so the engine's choice does not apply; ``--threads`` = the cores);
- one thread: ``--threads 1``;
- engine: nothing set: the free cores at the start, then between steps the count follows the load
  (engine/threads.py: LoadFollower; what ``make run`` does).

``--policies`` instead runs every cell at one thread per core under each OpenMP wait policy (the default spin,
``GOMP_SPINCOUNT`` 10000 and 1000, ``OMP_WAIT_POLICY=PASSIVE``) beside one thread: what a run that started on an
idle machine, and so took every core, pays when a load arrives.

The competing load is ``--load`` processes each running fp32 matmuls on torch's default threads (other jobs'
training), started 5 s before the loaded cells and stopped after them; then the same load arriving 15 s into each
job (a run that took every core on an idle machine). The table gives the busy cores (1 s sample) and the load
average at each cell's start.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

from atesd.engine.threads import busy_cores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "default (torch's threads, spinning waits)": ({"OMP_WAIT_POLICY": ""}, ["--threads", str(os.cpu_count() or 2)]),
    "one thread": ({}, ["--threads", "1"]),
    "engine (free cores, following the load)": ({}, []),
}
_ALL = ["--threads", str(os.cpu_count() or 2)]
POLICIES = {
    "one thread": ({}, ["--threads", "1"]),
    "default spin": ({"OMP_WAIT_POLICY": ""}, _ALL),
    "GOMP_SPINCOUNT=10000": ({"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "10000"}, _ALL),
    "GOMP_SPINCOUNT=1000": ({"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "1000"}, _ALL),
    "OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, _ALL),
}
LOAD = "import torch\na = torch.randn(512, 512)\nwhile True:\n    a = (a @ a).tanh()\n"


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS",
                                                              "GOMP_SPINCOUNT")}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    return {**env, **extra}


def main_job(flags: list[str], env: dict[str, str], steps: int, eval_problems: int) -> float:
    """Wall seconds of one `python -m engine.train` (the embedded default) in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-m", "engine.train", "--no-progress", "--output-dir", os.path.join(tmp, "run"),
                "--steps", str(steps), "--eval-problems", str(eval_problems), *flags]
        t0 = time.perf_counter()
        out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-2000:])
        return time.perf_counter() - t0


def _hogs(load: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", LOAD], env=_clean_env({}), stdout=subprocess.DEVNULL)
            for _ in range(load)]


def _start_into(hogs: list[subprocess.Popen], load: int) -> None:
    hogs.extend(_hogs(load))


def measure(steps: int = 60, eval_problems: int = 400, load: int = 2, configs: dict = CONFIGS,
            arrive_after: float = 15.0) -> list[dict]:
    """Three phases, each over every config: idle; under ``load`` matmul processes started before the job; and
    with the load arriving ``arrive_after`` seconds into the job (a run that started on an idle machine)."""
    rows = []
    for phase in ("idle", "loaded", "arriving"):
        hogs: list[subprocess.Popen] = _hogs(load) if phase == "loaded" else []
        if hogs:
            time.sleep(5)
        label = {"idle": "idle", "loaded": f"{load} matmul processes",
                 "arriving": f"{load} matmul processes from {arrive_after:.0f} s in"}[phase]
        try:
            for name, (env, flags) in configs.items():
                la, busy = os.getloadavg()[0], busy_cores(window=1.0)
                timer = None
                if phase == "arriving":
                    timer = threading.Timer(arrive_after, _start_into, (hogs, load))
                    timer.start()
                try:
                    seconds = main_job(flags, _clean_env(env), steps, eval_problems)
                finally:
                    if timer is not None:
                        timer.cancel()
                        for p in hogs:
                            p.kill()
                            p.wait()
                        hogs.clear()
                rows.append({"load": label, "config": name, "seconds": seconds, "loadavg_at_start": la,
                             "busy_at_start": busy})
                print(rows[-1], file=sys.stderr, flush=True)
                if phase == "arriving":
                    time.sleep(5)
        finally:
            for p in hogs:
                p.kill()
                p.wait()
        time.sleep(10)
    return rows


def render(rows: list[dict], command: str) -> str:
    lines = [f"`{command}` ({os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}): main job wall time, seconds\n",
             "| machine | config | wall s | vs one thread | busy cores at start (1 s) | load average at start |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        one = next(x["seconds"] for x in rows if x["load"] == r["load"] and x["config"] == "one thread")
        busy = "n/a" if r["busy_at_start"] is None else f"{r['busy_at_start']:.1f}"
        lines.append(f"| {r['load']} | {r['config']} | {r['seconds']:.1f} | {r['seconds'] / one:.2f}x | {busy} | "
                     f"{r['loadavg_at_start']:.1f} |")
    return "\n".join(lines) + "\n"


def test_main_job_on_a_busy_machine(benchmark):
    rows = benchmark.pedantic(measure, kwargs={"steps": 20, "eval_problems": 100}, rounds=1, iterations=1)
    print("\n" + render(rows, "pytest benchmarks/bench_busy.py --benchmark (20 steps, 100 evaluation problems)"))
    # the engine's choice is never several times slower than one thread, idle or loaded
    for r in rows:
        if r["config"].startswith("engine"):
            one = next(x["seconds"] for x in rows if x["load"] == r["load"] and x["config"] == "one thread")
            assert r["seconds"] < 2 * one, r


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-problems", type=int, default=400)
    ap.add_argument("--load", type=int, default=2, help="competing matmul processes (default 2)")
    ap.add_argument("--policies", action="store_true", help="OpenMP wait policies at one thread per core instead")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still stops the competing load (finally)
    command = "python -m benchmarks.bench_busy " + " ".join(argv if argv is not None else sys.argv[1:])
    md = render(measure(args.steps, args.eval_problems, args.load, POLICIES if args.policies else CONFIGS), command)
    print(md)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(md)


if __name__ == "__main__":
    main()
