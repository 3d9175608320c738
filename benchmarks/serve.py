"""A warm ``reaudio serve`` against the one-shot ``reaudio generate``: seconds from asking to having the WAV.

One-shot: ``reaudio generate PROMPT -o X.wav`` in a fresh process each time (start-up, model loading and the
generation), ``--repeats`` times. Served: ``reaudio serve --port 0`` started once (its loading timed until it
listens), then ``--repeats + 1`` POSTs of the same request to ``/api/generate``, each timed from the request to
the WAV fetched; the first is reported apart, the rest (the second request on) as the warm figure. Both use the
offline preset, the same prompt, seed, steps and ``--threads``. Writes ``benchmarks/results/serve.md``.

    python -m benchmarks.serve [--repeats 3] [--threads 1]     # or: reaudio bench serve
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from reaudio_core.io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a dog barks"


def one_shot(args, out: Path) -> float:
    cmd = [sys.executable, "-m", "reaudio_core.cli", "generate", PROMPT, "-o", str(out), "--steps", str(args.steps),
           "--seed", "0", "--threads", str(args.threads), "--quiet"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - t0


def served(args) -> tuple[float, list[float]]:
    """(seconds until the server listens, seconds per request in order)."""
    cmd = [sys.executable, "-m", "reaudio_core.cli", "serve", "--port", "0", "--threads", str(args.threads)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    try:
        for line in proc.stdout:
            if line.startswith("reaudio serve: http://"):
                url = line.split()[2].rstrip("/")
                break
        else:
            raise SystemExit(f"reaudio serve did not start (exit {proc.wait()})")
        ready = time.perf_counter() - t0
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        body = json.dumps({"prompt": PROMPT, "seed": 0, "steps": args.steps}).encode()
        times = []
        for _ in range(args.repeats + 1):
            t = time.perf_counter()
            req = urllib.request.Request(url + "/api/generate", data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=600) as r:
                wav = json.loads(r.read())["wav"]
            with urllib.request.urlopen(url + wav, timeout=60) as r:
                assert r.read(4) == b"RIFF"
            times.append(time.perf_counter() - t)
        return ready, times
    finally:
        proc.terminate()
        proc.wait(30)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="reaudio bench serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cli = [one_shot(args, Path(tmp) / f"{i}.wav") for i in range(args.repeats)]
    ready, requests = served(args)
    warm = requests[1:]
    load = os.getloadavg()[0]
    lines = ["# A warm `reaudio serve` against the one-shot `reaudio generate`", "",
             f"'{PROMPT}', offline preset (5.12 s at 16 kHz), {args.steps} steps, seed 0, --threads {args.threads}; "
             f"{os.cpu_count()} CPUs, load average {load:.1f} at the end. Seconds from asking to having the WAV. "
             f"`python -m benchmarks.serve --repeats {args.repeats} --threads {args.threads}`", "",
             "| what | runs | median s | min s | max s |", "|---|--:|--:|--:|--:|",
             f"| one-shot `reaudio generate` (process start, loading, generation) | {len(cli)} | "
             f"{statistics.median(cli):.2f} | {min(cli):.2f} | {max(cli):.2f} |",
             f"| `reaudio serve`: start until it listens (loading, once) | 1 | {ready:.2f} | {ready:.2f} | {ready:.2f} |",
             f"| `reaudio serve`: first request | 1 | {requests[0]:.2f} | {requests[0]:.2f} | {requests[0]:.2f} |",
             f"| `reaudio serve`: second request on (warm) | {len(warm)} | {statistics.median(warm):.2f} | "
             f"{min(warm):.2f} | {max(warm):.2f} |", "",
             f"A warm request takes {statistics.median(warm) / statistics.median(cli):.0%} of the one-shot command's time."]
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write_text(Path(args.out) / "serve.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
