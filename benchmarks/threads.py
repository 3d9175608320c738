"""Threads and the OpenMP wait policy for one offline generation, on an idle and on a busy machine.

Each setting runs in a fresh process (the OpenMP runtime reads ``OMP_WAIT_POLICY`` once, at start-up), loads the
shipped ``offline`` preset, generates once to warm up and then ``--repeats`` times ('a dog barks', 20 steps,
5.12 s, seed 0); the table gives the median seconds per generation. "busy" runs as many CPU-bound processes as the
machine has cores beside it (pure-Python loops, stopped when the setting ends): the situation of a user who
generates while something else computes. Writes ``benchmarks/results/threads.md``.

    python -m benchmarks.threads [--repeats 3]     # or: reaudio bench threads
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from reaudio_core.io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import time, torch
from reaudio_core.pipeline import ReAudioPipeline
torch.set_num_threads({threads})
pipe = ReAudioPipeline.from_preset("offline")
pipe("a dog barks", progress=False)
times = []
for _ in range({repeats}):
    t0 = time.perf_counter()
    pipe("a dog barks", progress=False)
    times.append(time.perf_counter() - t0)
print(" ".join(f"{{t:.4f}}" for t in times))
"""

BUSY = "import time\nt = time.time()\nwhile time.time() - t < 900:\n    pass\n"


def measure(threads: int, policy: str, busy: bool, repeats: int) -> list[float]:
    env = {**os.environ, "OMP_WAIT_POLICY": policy, "HF_HUB_OFFLINE": "1", "REAUDIO_CHECKS": "1"}
    env.pop("OMP_NUM_THREADS", None)
    hogs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(os.cpu_count() or 2)] if busy else []
    try:
        out = subprocess.run([sys.executable, "-c", CHILD.format(threads=threads, repeats=repeats)], env=env,
                             capture_output=True, text=True, timeout=1800, cwd=str(REPO))
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    if out.returncode != 0:
        raise SystemExit(f"setting threads={threads} {policy} failed:\n{out.stderr[-2000:]}")
    return [float(t) for t in out.stdout.split()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="reaudio bench threads", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    rows = []
    for busy in (False, True):
        for policy in ("ACTIVE", "PASSIVE"):
            for threads in (1, 2):
                times = measure(threads, policy, busy, args.repeats)
                rows.append((("busy" if busy else "idle"), policy, threads, statistics.median(times), max(times)))
                print(f"{rows[-1][0]:<5} OMP_WAIT_POLICY={policy:<8} threads={threads}: median {rows[-1][3]:.2f} s",
                      file=sys.stderr)
    lines = ["# Threads and OpenMP wait policy: one offline generation", "",
             f"Machine: {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f} at the end. 'a dog barks', "
             f"offline preset, 20 steps, 5.12 s, median of {args.repeats} after a warm-up, each setting in a fresh "
             f"process; busy = {os.cpu_count()} CPU-bound processes beside it. `python -m benchmarks.threads`", "",
             "| machine | OMP_WAIT_POLICY | torch threads | median s | max s |", "|---|---|--:|--:|--:|"]
    lines += [f"| {m} | {p} | {t} | {med:.2f} | {mx:.2f} |" for m, p, t, med, mx in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write_text(Path(args.out) / "threads.md", text)  # creates the folder
    return 0


if __name__ == "__main__":
    sys.exit(main())
