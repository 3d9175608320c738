"""The vocoder section of the generation benchmark (``reaudio bench generation --vocoders``): the cost of one
vocoder call at S size, the light decode path (issue 23, item 4) beside HiFi-GAN V1 and Griffin-Lim.

Each vocoder is built from its registry.yaml defaults (``hifigan``: HiFi-GAN V1, ``griffin-lim``: 32
iterations, ``vocos``: dim 512 / 8 ConvNeXt layers / n_fft 640) with random weights (seed 0): the cost of a
call does not depend on the weights' values. Input: the log-mel [1, T, 64] of a synthetic tone-plus-noise
clip of ``--duration`` seconds (default 10.24 s -> 1024 frames), batch 1. One untimed warm-up call each, then
``--repeats`` rounds, each round timing every vocoder once in turn (interleaved, so a change in the machine's
load hits all of them alike); the median and minimum are kept, and each vocoder's median round ratio against
HiFi-GAN (its time / HiFi-GAN's time in the same round).

Writes OUT/vocoders.md (the printed report) and OUT/vocoders.json (every time).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from reaudio_core.io import atomic_write_text

from .constants import SEED

VOCODERS = ("hifigan", "griffin-lim", "vocos")
BASELINE = "hifigan"


def clip_mel(seconds: float) -> torch.Tensor:
    """The log-mel ``[1, T, 64]`` of a tone-plus-noise clip (three partials, a slow amplitude swell)."""
    from reaudio_core.mel import log_mel
    rng = np.random.default_rng(SEED)
    t = np.arange(int(round(seconds * 16000))) / 16000
    swell = 0.5 + 0.5 * np.sin(2 * np.pi * 0.5 * t)
    wav = swell * sum(0.2 / k * np.sin(2 * np.pi * 220 * k * t) for k in (1, 2, 3)) + 0.02 * rng.standard_normal(len(t))
    return log_mel(wav.astype(np.float32))


def build(name: str):
    from reaudio_core.registry import get_registry
    torch.manual_seed(SEED)
    voc = get_registry().create("vocoder", name)
    model = getattr(voc, "model", None)
    params = sum(p.numel() for p in model.parameters()) if isinstance(model, torch.nn.Module) else 0
    return voc, params


def measure(seconds: float, repeats: int) -> dict:
    mel = clip_mel(seconds)
    vocoders = {name: build(name) for name in VOCODERS}
    times = {name: [] for name in VOCODERS}
    with torch.inference_mode(), tqdm(total=(repeats + 1) * len(VOCODERS), file=sys.stderr, unit="call") as bar:
        for name, (voc, _) in vocoders.items():  # warm-up (first-call allocations, Griffin-Lim's pinv)
            wav = voc(mel)
            assert wav.shape == (1, mel.shape[1] * 160), (name, tuple(wav.shape))
            bar.update()
        for _ in range(repeats):
            for name, (voc, _) in vocoders.items():
                t0 = time.perf_counter()
                voc(mel)
                times[name].append(time.perf_counter() - t0)
                bar.update()
    base = times[BASELINE]
    rows = {}
    for name, (_, params) in vocoders.items():
        rows[name] = {"params": params, "median_s": statistics.median(times[name]), "min_s": min(times[name]),
                      "ratio_to_hifigan": statistics.median(t / b for t, b in zip(times[name], base)),
                      "times_s": times[name]}
    return {"frames": int(mel.shape[1]), "seconds": seconds, "rows": rows}


def markdown(result: dict, threads: int, repeats: int, load: tuple, total: float) -> str:
    from reaudio_core.registry import get_registry
    reg = get_registry()
    lines = ["# Vocoder cost at S size", "",
             f"One vocoder call on the log-mel of a {result['seconds']:.2f} s clip ([1, {result['frames']}, 64], "
             f"batch 1), {threads} torch threads, fp32, random weights (seed {SEED}) at each vocoder's registry.yaml "
             f"defaults; {repeats} interleaved rounds after one warm-up call each; median (min) seconds per call; "
             f"ratio = the vocoder's time / HiFi-GAN's in the same round, median over rounds. Load average "
             f"{load[0]:.1f} at the start, {load[1]:.1f} at the end; {total:.0f} s in all "
             "(`reaudio bench generation --vocoders`).", "",
             "| vocoder | registry defaults | parameters | s per call (median) | min | vs HiFi-GAN | real-time factor |",
             "|---|---|--:|--:|--:|--:|--:|"]
    for name, row in result["rows"].items():
        params = {k: v for k, v in reg.resolve_params("vocoder", name, {}).items() if k not in ("checkpoint", "device")}
        shown = ", ".join(f"{k} {v}" for k, v in params.items())
        lines.append(f"| {name} | {shown} | {row['params'] / 1e6:.2f} M | {row['median_s']:.3f} | {row['min_s']:.3f} | "
                     f"{row['ratio_to_hifigan']:.3f}x | {result['seconds'] / row['median_s']:.1f} |")
    lines += ["", "Real-time factor: clip seconds per second of vocoding. Griffin-Lim has no weights; its cost is "
              "its iterations of STFT / inverse STFT at n_fft 1024. Vocos runs its convolutions at the mel frame rate "
              "(100 frames per second) and makes the samples with one inverse STFT, where HiFi-GAN upsamples 160x "
              "through its convolution stacks."]
    return "\n".join(lines) + "\n"


def main(out: Path, threads: int, repeats: int, duration: float | None) -> dict:
    started, load0 = time.perf_counter(), os.getloadavg()
    result = measure(duration or 10.24, repeats)
    total = time.perf_counter() - started
    load = (load0[0], os.getloadavg()[0])
    text = markdown(result, threads, repeats, load, total)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "vocoders.md", text)
    atomic_write_text(out / "vocoders.json", json.dumps({**result, "threads": threads, "repeats": repeats,
                                                         "load_average": list(load), "total_s": total,
                                                         "torch": torch.__version__}, indent=1))
    print(f"# wrote {out / 'vocoders.md'}, {out / 'vocoders.json'}", file=sys.stderr)
    return result
