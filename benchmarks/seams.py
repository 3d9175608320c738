"""Seams of long clips: the spectral flux where windows meet against the flux inside them.

For each of ``--prompts`` prompts (the first distinct captions of the offline preset's database, 'the sound of
X', sorted) and seed 0, the shipped ``offline`` preset makes a ``--duration`` s clip two ways:

* **outpainted + crossfade** (``reaudio generate --duration``, :mod:`reaudio_core.longclip`): windows of 5.12 s
  overlapping by 1.28 s, each after the first outpainting the previous one's tail, log-mels crossfaded;
* **independent, cut** (the baseline): independent 5.12 s generations (seeds 0, 1, ...), each vocoded, cut to
  the same used length (less ``generation.window_trim``, the trailing silence) and butted end to end.

Spectral flux per 10 ms frame: the L2 norm over the 64 bins of the positive change of the output waveform's
log-mel (:func:`reaudio_core.mel.log_mel`) from the frame before. A seam's flux is the largest flux within
+-3 frames (30 ms) of where the windows meet (outpainting: where the kept tail of the previous window ends and
where the crossfade starts, the larger); the flux inside windows is the same +-3-frame maximum at every frame
farther than 10 frames from any seam. Writes ``benchmarks/results/seams.md``.

    python -m benchmarks.seams [--prompts 8] [--duration 20]     # or: reaudio bench seams
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from reaudio_core.io import atomic_write_text

RADIUS = 3  #: frames either side of a seam (30 ms)
CLEAR = 10  #: frames from any seam before a frame counts as inside a window


def flux(wave: torch.Tensor) -> np.ndarray:
    """Per-frame spectral flux of a 16 kHz waveform (frame 0: 0)."""
    from reaudio_core.mel import log_mel
    m = log_mel(wave.reshape(-1))[0]
    rise = torch.relu(m[1:] - m[:-1])
    return np.concatenate([[0.0], rise.pow(2).sum(1).sqrt().numpy()])


def local_max(f: np.ndarray) -> np.ndarray:
    pad = np.pad(f, RADIUS, mode="edge")
    return np.max(np.stack([pad[i:i + len(f)] for i in range(2 * RADIUS + 1)]), axis=0)


def split(f: np.ndarray, seams: list[list[int]]) -> tuple[list[float], list[float]]:
    """(one value per seam: the largest local maximum at its points, the local maxima inside windows)."""
    lm = local_max(f)
    points = [p for seam in seams for p in seam]
    inside = [float(lm[t]) for t in range(1, len(f)) if min(abs(t - p) for p in points) > CLEAR]
    return [max(float(lm[p]) for p in seam if p < len(f)) for seam in seams], inside


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="reaudio bench seams", description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from reaudio_core.longclip import plan
    from reaudio_core.pipeline import ReAudioPipeline
    from tqdm.auto import tqdm
    pipe = ReAudioPipeline.from_preset("offline")
    prompts = sorted({it["caption"] for it in pipe.database.items})[:args.prompts]
    windows = plan(pipe, args.duration)
    frames, win = windows.frames, windows.used
    out_seams = [[i * windows.hop, i * windows.hop + windows.overlap_frames] for i in range(1, windows.count)]
    cut_count = -(-frames // win)
    cut_seams = [[i * win] for i in range(1, cut_count)]
    results = {"outpainted + crossfade": ([], []), "independent, cut": ([], [])}
    for prompt in tqdm(prompts, desc="prompts"):
        long = pipe(prompt, seed=0, duration=args.duration, progress=False).waveforms[0]
        parts = [pipe(prompt, seed=i, progress=False).waveforms[0][:win * 160] for i in range(cut_count)]
        cut = torch.cat(parts)[:len(long)]
        for name, wave, seams in (("outpainted + crossfade", long, out_seams), ("independent, cut", cut, cut_seams)):
            at, inside = split(flux(wave), seams)
            results[name][0].extend(at)
            results[name][1].extend(inside)
    lines = ["# Seams of long clips: spectral flux where windows meet vs inside them", "",
             f"Shipped offline preset (5.12 s windows less 0.16 s, overlap 1.28 s, 20 steps, guidance 5, seed 0), {len(prompts)} prompts (the "
             f"first distinct ESC-50 fold-4 database captions, sorted), {args.duration:g} s clips at 16 kHz. Flux: L2 "
             f"of the positive log-mel change per 10 ms frame, largest within +-{RADIUS} frames; inside = every frame "
             f"more than {CLEAR} frames from a seam. `python -m benchmarks.seams --prompts {args.prompts} "
             f"--duration {args.duration:g}`", "",
             "| method | seams | flux at seams (mean) | inside windows (mean) | ratio | seams above the inside 95th pct |",
             "|---|--:|--:|--:|--:|--:|"]
    for name, (at, inside) in results.items():
        p95 = np.percentile(inside, 95)
        lines.append(f"| {name} | {len(at)} | {np.mean(at):.2f} | {np.mean(inside):.2f} | "
                     f"{np.mean(at) / np.mean(inside):.2f} | {100 * np.mean(np.array(at) > p95):.0f}% |")
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write_text(Path(args.out) / "seams.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
