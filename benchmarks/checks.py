#!/usr/bin/env python
"""What the contract checks (reaudio_core/checks.py) cost: one generation with the shipped ``offline``
preset (its trained weights and database, 5.12 s clip, 20 DPM-Solver++ steps) with and without them.

Two pipelines are built in one process from the same configuration: one with the checks on (every
component checked, the pipeline's conditioning check on), one built and run with ``checks.set_enabled(False)``
(components unwrapped, as with ``REAUDIO_CHECKS=0``). Their generations are interleaved, alternating which
goes first, so drift in the machine's load hits both alike; the waveforms must come out identical. Beside the
end-to-end medians, the time spent inside the check functions of the checked run is summed directly (each
check timed with ``perf_counter``), which does not depend on the noise of two end-to-end timings.

    python benchmarks/checks.py [--repeats 5] [--steps 20] [--threads 2] [--out DIR]
    reaudio bench checks [same flags]

Prints a markdown report and writes it to DIR/checks.md (default benchmarks/results).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from reaudio_core import checks  # noqa: E402
from reaudio_core.config import compose  # noqa: E402
from reaudio_core.io import atomic_write_text  # noqa: E402
from reaudio_core.pipeline import ReAudioPipeline  # noqa: E402

PROMPT = "a dog barks"
TARGET = 0.01


def timed_checks(spent: dict):
    """Make every output check (and the conditioning check) add its time to ``spent[name]``; must run
    before the checked pipeline is built (checked classes capture the check functions). Returns the undo."""
    saved = ({kind: dict(methods) for kind, methods in checks.CHECKS.items()}, checks.check_conditioning)
    checks._CLASSES.clear()  # checked classes made earlier in this process captured the untimed checks

    def undo():
        for kind, methods in saved[0].items():
            checks.CHECKS[kind].update(methods)
        checks.check_conditioning = saved[1]
        checks._CLASSES.clear()  # classes made from here on capture the untimed checks

    def timer(name, fn):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - t0
        return run
    for kind, methods in checks.CHECKS.items():
        for method, fn in list(methods.items()):
            methods[method] = timer(f"{kind}.{method}", fn)
    checks.check_conditioning = timer("pipeline conditioning", checks.check_conditioning)
    return undo


def generate(pipe, on: bool, steps: int):
    checks.set_enabled(on)
    t0 = time.perf_counter()
    out = pipe(PROMPT, seed=0, steps=steps, progress=False)
    return time.perf_counter() - t0, out.waveforms


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="generations per setting (interleaved)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the preset's)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="where checks.md goes")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    torch.set_num_threads(args.threads)
    cfg = compose("offline")
    steps = args.steps or cfg["generation"]["steps"]
    spent: dict[str, float] = defaultdict(float)
    undo = timed_checks(spent)
    times: dict[bool, list[float]] = {True: [], False: []}
    inside: list[float] = []  # per checked generation: seconds inside the checks
    by_check: dict[str, list[float]] = defaultdict(list)
    waves = {}
    try:
        checks.set_enabled(True)
        checked = ReAudioPipeline.from_config(cfg)
        checks.set_enabled(False)
        plain = ReAudioPipeline.from_config(cfg)
        assert checks.is_checked(checked.denoiser) and not checks.is_checked(plain.denoiser)
        generate(checked, True, steps)  # warm-up, not timed
        generate(plain, False, steps)
        load0 = os.getloadavg()[0]
        for r in range(args.repeats):
            for on in ((True, False) if r % 2 == 0 else (False, True)):
                spent.clear()
                seconds, waves[on] = generate(checked if on else plain, on, steps)
                times[on].append(seconds)
                if on:
                    inside.append(sum(spent.values()))
                    for name, s in spent.items():
                        by_check[name].append(s)
    finally:
        checks.set_enabled(True)
        undo()
    if not torch.equal(waves[True], waves[False]):
        raise SystemExit("the checked and unchecked pipelines generated different audio")
    on, off = statistics.median(times[True]), statistics.median(times[False])
    per_gen = statistics.median(inside)
    lines = [
        "# Contract checks: overhead",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch threads; "
        f"torch {torch.__version__}, Python {platform.python_version()}; load average {load0:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end (other work on the machine adds noise to both columns alike).",
        "",
        f"One generation with the `offline` preset (shipped weights and database): prompt {PROMPT!r}, "
        f"{cfg['generation']['duration']} s clip, {steps} steps, k={cfg['generation']['k']}, seed 0; "
        f"{args.repeats} interleaved repeats per setting after one warm-up each; the two settings' waveforms are "
        "identical. `python benchmarks/checks.py`",
        "",
        "| setting | median s | min s | max s | ratio to unchecked (median) | ratio (min) |",
        "|---|--:|--:|--:|--:|--:|",
        f"| checks on | {on:.3f} | {min(times[True]):.3f} | {max(times[True]):.3f} | {on / off:.4f} | "
        f"{min(times[True]) / min(times[False]):.4f} |",
        f"| checks off (`REAUDIO_CHECKS=0`) | {off:.3f} | {min(times[False]):.3f} | {max(times[False]):.3f} | 1 | 1 |",
        "",
        f"Time inside the checks per checked generation (median of {args.repeats}; max {max(inside) * 1e3:.2f} ms): "
        f"**{per_gen * 1e3:.2f} ms, {per_gen / off:.3%} of the unchecked median** (target < {TARGET:.0%}: "
        f"{'met' if per_gen / off < TARGET else 'NOT met'}). The end-to-end ratios above also carry the machine's "
        "noise, which on a shared machine is larger than the checks.",
        "",
        "| check | ms per generation (median) | max |",
        "|---|--:|--:|",
        *(f"| {name} | {statistics.median(v) * 1e3:.3f} | {max(v) * 1e3:.3f} |"
          for name, v in sorted(by_check.items(), key=lambda kv: -statistics.median(kv[1]))),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    atomic_write_text(Path(args.out) / "checks.md", text)  # creates the folder
    return 0


if __name__ == "__main__":
    sys.exit(main())
