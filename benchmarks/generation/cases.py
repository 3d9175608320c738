"""What the generation benchmark measures per size: the random-init pipeline of a size over a synthetic cached
database, end to end per precision, the uncached encoders, the loop against the bare diffusers loop, guidance
batched against two calls, the samplers and the steps sweep (``bench_size``)."""
from __future__ import annotations

import copy
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from reaudio_core.config import build, compose
from reaudio_core.database import build_database
from reaudio_core.pipeline import ReAudioPipeline
from reaudio_core.registry import ReaudioError, get_registry

from .constants import CAPTIONS, GUIDANCE, PRECISIONS, PROMPT, SEED, SIZE_DEFAULTS
from .measure import Clock, bare_loop, diff, peak_rss_gb, pipeline_loop, probed, reset_peak_rss, timed


# -- building ------------------------------------------------------------------------------------------
def encoder_entries(size: str, encoders: str) -> dict:
    audio_size = "tiny" if size == "tiny" else "base"
    audiomae = {"name": "audiomae", "params": {"pretrained": None, "random_init": True, "size": audio_size}}
    if encoders == "minilm":
        return {"text_encoder": "minilm", "caption_encoder": "minilm", "audio_encoder": audiomae}
    big = size != "tiny"
    return {"text_encoder": {"name": "clap", "params": {"pretrained": None, "random_init": True,
                                                         "size": "full" if big else "tiny"}},
            "caption_encoder": {"name": "t5", "params": {"pretrained": None, "random_init": True,
                                                         "size": "large" if big else "tiny"}},
            "audio_encoder": audiomae}


def size_layer(size: str, encoders: str, duration: float, steps: int) -> dict:
    """The configuration layer of one benchmarked size (over the registry defaults)."""
    if size == "tiny":
        layer = copy.deepcopy(get_registry().preset("tiny"))
        layer.pop("description", None)
    elif size == "s":
        layer = {"retriever": "torch", "denoiser": {"name": "unet-ldm", "params": {"size": "s"}},
                 "decoder": "vae", "vocoder": "hifigan"}  # registry.yaml's reference sizes
    else:
        raise ReaudioError(f"unknown size {size!r}: choose from {', '.join(SIZE_DEFAULTS)}")
    layer.update(encoder_entries(size, encoders))
    layer["retriever"] = "torch"
    layer["generation"] = {**layer.get("generation", {}), "retrieval": "audio+text", "k": SIZE_DEFAULTS[size]["k"],
                           "sampler": "dpm-solver", "steps": steps, "guidance": GUIDANCE, "duration": duration,
                           "max_duration": max(duration, 10.24), "precision": "fp32", "seed": SEED,
                           "candidates": 1, "require_weights": False}
    layer["database"] = {"neighbours": len(CAPTIONS) - 1}
    return layer


def write_clips(root: Path, seconds: float) -> Path:
    """Tone-plus-noise clips and a manifest (path, caption, label)."""
    rng = np.random.default_rng(SEED)
    rows = ["path,caption,label"]
    t = np.arange(int(round(seconds * 16000))) / 16000
    for i, caption in enumerate(CAPTIONS):
        wav = 0.3 * np.sin(2 * np.pi * (180 + 140 * i) * t) + 0.03 * rng.standard_normal(len(t))
        sf.write(str(root / f"clip{i}.wav"), wav.astype(np.float32), 16000)
        rows.append(f"clip{i}.wav,{caption},{caption.split()[1]}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root / "manifest.csv"


def build_pipeline(size: str, encoders: str, duration: float, steps: int, work: Path) -> tuple[ReAudioPipeline, dict]:
    """Random-init components for ``size``, a cached synthetic database; returns (pipeline, build info)."""
    t0 = time.perf_counter()
    torch.manual_seed(SEED)
    layer = size_layer(size, encoders, duration, steps)
    cfg = compose(None, base=layer)
    enc = {slot: build(cfg, slot) for slot in ("text_encoder", "caption_encoder", "audio_encoder")}
    layer["denoiser"] = {"name": "unet-ldm", "params": {
        **(layer["denoiser"].get("params") or {}), "prompt_dim": enc["text_encoder"].dim,
        "text_dim": enc["caption_encoder"].token_dim, "audio_dim": enc["audio_encoder"].token_dim}}
    cfg = compose(None, base=layer)
    cfg["preset"] = f"bench-{size}"
    components = {**enc, **{slot: build(cfg, slot) for slot in ("denoiser", "decoder", "vocoder")}}
    root = work / size
    root.mkdir(parents=True, exist_ok=True)
    manifest = write_clips(root, duration)
    build_database([manifest], root / "db", {**cfg, "audio_encoder": None}, progress=False)
    from reaudio_core.database import Database
    pipe = ReAudioPipeline(cfg, components, Database.open(root / "db"))
    pipe.cache_features(progress=False)
    params = {slot: sum(p.numel() for p in getattr(pipe, slot).model.parameters()) / 1e6
              for slot in ("denoiser", "decoder", "vocoder") if hasattr(getattr(pipe, slot), "model")}
    info = {"build_s": time.perf_counter() - t0, "params_m": params, "latent_shape": list(pipe.latent_shape(duration)),
            "duration": duration, "encoders": {s: {"name": cfg[s]["name"], "dim": getattr(e, "dim", None),
                                                   "token_dim": getattr(e, "token_dim", None)}
                                               for s, e in enc.items()},
            "denoiser": cfg["denoiser"]["params"], "decoder": cfg["decoder"]["params"],
            "vocoder": {"name": cfg["vocoder"]["name"], **cfg["vocoder"]["params"]}, "k": cfg["generation"]["k"],
            "caption_tokens": cfg["generation"]["caption_tokens"], "database_items": len(CAPTIONS)}
    return pipe, info


# -- one size ------------------------------------------------------------------------------------------
def run_e2e(pipe: ReAudioPipeline, steps: int, precision: str = "fp32", bf16_decode: bool = False,
            sampler: str = "dpm-solver") -> tuple[dict, object]:
    clock = Clock()
    gen = pipe.cfg["generation"]
    old = gen["precision"]
    gen["precision"] = precision
    try:
        with probed(pipe, clock, bf16_decode), torch.inference_mode():
            t0 = time.perf_counter()
            out = pipe(PROMPT, seed=SEED, steps=steps, sampler=sampler, progress=False)
            total = time.perf_counter() - t0
    finally:
        gen["precision"] = old
    s = dict(clock.seconds)
    stages = {
        "prompt encoder": s.get("prompt encoder", 0.0),
        "retrieval": s.get("retrieval", 0.0),
        "caption encoder": s.get("caption encoder", 0.0),
        "neighbour features": max(0.0, s.get("conditioning", 0.0) - s.get("prompt encoder", 0.0)
                                  - s.get("retrieval", 0.0) - s.get("caption encoder", 0.0)
                                  - s.get("audio encoder", 0.0)),
        "audio encoder": s.get("audio encoder", 0.0),
        "unet": s.get("unet", 0.0),
        "loop rest": max(0.0, s.get("sampling", 0.0) - s.get("unet", 0.0)),
        "vae": s.get("vae", 0.0),
        "vocoder": s.get("vocoder", 0.0),
    }
    stages["other"] = max(0.0, total - s.get("conditioning", 0.0) - s.get("sampling", 0.0) - stages["vae"]
                          - stages["vocoder"])
    row = {"total": total, "stages": stages, "unet_calls": clock.calls.get("unet", 0),
           "unet_step": stages["unet"] / max(1, clock.calls.get("unet", 0)), "sampling": s.get("sampling", 0.0),
           "conditioning": s.get("conditioning", 0.0), "steps": steps, "precision": precision,
           "bf16_decode": bf16_decode}
    return row, out


def median_run(runs: list[dict]) -> dict:
    """The run with the median end-to-end time (its stage times add up), plus every run's total."""
    order = sorted(runs, key=lambda r: r["total"])
    row = dict(order[(len(order) - 1) // 2])
    row["totals"] = [r["total"] for r in runs]
    row["runs"] = len(runs)
    return row


def bf16_decision(size: str, args) -> tuple[bool, str]:
    """Whether to run the bf16 variants at ``size`` (``--bf16 auto``: where the CPU has fast bf16, and at
    tiny, where even a slow bf16 path costs seconds), and why not."""
    if args.bf16 == "on":
        return True, ""
    if args.bf16 == "off":
        return False, "skipped (--bf16 off)"
    p = args.bf16_probe
    if p["fast"] or size == "tiny":
        return True, ""
    return False, (f"skipped: no fast bf16 on this CPU (flags: {', '.join(args.cpu_flags) or 'none found'}; a 3x3 "
                   f"convolution runs {p['conv_ratio']:.0f}x slower under bf16 autocast than in fp32, so a bf16 run "
                   f"at this size would take hours); pass --bf16 on to measure it anyway")


def tasks(size: str, args) -> int:
    """Progress-bar steps of one size."""
    n_prec = len(PRECISIONS) if bf16_decision(size, args)[0] else 1
    return 3 + n_prec + len(args.sampler_steps) + len([n for n in args.steps if n != args.target_steps])


def bench_size(size: str, args, work: Path, bar: tqdm) -> dict:
    def step(what: str):
        bar.set_description(f"{size}: {what}")
        bar.update(1)

    duration = args.duration or SIZE_DEFAULTS[size]["duration"]
    reset_peak_rss()
    pipe, info = build_pipeline(size, args.encoders, duration, args.target_steps, work)
    info["peak_rss_build_gb"] = peak_rss_gb()
    step("built")
    shape = pipe.latent_shape(duration)
    res = {"size": size, "info": info}

    # end to end at the target, per stage, for each precision; each after a short warm-up run of its own
    # (allocator, one-off kernel selection)
    precision = {}
    outputs = {}
    run_bf16, why = bf16_decision(size, args)
    res["precision_skipped"] = None if run_bf16 else why
    for label, prec, bf16_decode in PRECISIONS:
        if prec == "bf16" and not run_bf16:
            continue
        run_e2e(pipe, min(2, args.target_steps), prec, bf16_decode)
        reset_peak_rss()
        runs = []
        for _ in range(args.repeats):
            row, out = run_e2e(pipe, args.target_steps, prec, bf16_decode)
            runs.append(row)
        row = median_run(runs)
        row["peak_rss_gb"] = peak_rss_gb()
        row["label"] = label
        row["mel_std"] = float(out.mels.float().std())
        outputs[label] = out
        if label != "fp32":
            row["mel_vs_fp32"] = diff(out.mels, outputs["fp32"].mels)
            row["wave_vs_fp32"] = diff(out.waveforms, outputs["fp32"].waveforms)
        precision[label] = row
        step(f"end to end {label}")
    res["precision"] = precision
    res["e2e"] = precision["fp32"]

    # the encoders on neighbours when their features are not cached
    from reaudio_core.audio import load_audio
    neighbours = pipe.retrieve(pipe.text_encoder.embed([PROMPT]), pipe.cfg["generation"]["k"])[0]
    n_tok = pipe.cfg["generation"]["caption_tokens"]
    uncached = {"caption encoder": [], "audio encoder": []}
    with torch.inference_mode():
        for _ in range(args.repeats):
            uncached["caption encoder"].append(timed(pipe.caption_encoder.encode_tokens,
                                                     [n["caption"] for n in neighbours], max_tokens=n_tok)[0])
            uncached["audio encoder"].append(timed(lambda: pipe.audio_encoder.encode_tokens(
                [load_audio(n["path"]) for n in neighbours]))[0])
    res["uncached"] = {k: statistics.median(v) for k, v in uncached.items()}
    step("uncached encoders")

    # the denoising loop: this pipeline's against a bare diffusers loop (same module, scheduler, inputs);
    # guidance batched (2B) against two calls; interleaved, the order rotating
    with torch.inference_mode():
        cond, uncond, _ = pipe.condition([PROMPT], pipe.cfg["generation"]["k"])
    variants = {
        "pipeline": lambda n: pipeline_loop(pipe, cond, uncond, shape, n, "dpm-solver", 0.0),
        "bare": lambda n: bare_loop(pipe, cond, uncond, shape, n, "dpm-solver", 0.0),
        "bare two calls": lambda n: bare_loop(pipe, cond, uncond, shape, n, "dpm-solver", 0.0, batched=False),
    }
    for run_variant in variants.values():  # a short untimed run of each: no variant pays a first-run cost
        run_variant(min(2, args.target_steps))
    times, latents = defaultdict(list), {}
    names = list(variants)
    for r in range(args.repeats):  # rotate the order: over len(names) repeats each takes every position once
        for name in names[r % len(names):] + names[:r % len(names)]:
            t, latents[name] = timed(variants[name], args.target_steps)
            times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    res["loop"] = {"steps": args.target_steps, "sampler": "dpm-solver", "pipeline_s": med["pipeline"],
                   "bare_s": med["bare"], "ratio": med["pipeline"] / med["bare"], "runs": args.repeats,
                   "pipeline_all": times["pipeline"], "bare_all": times["bare"],
                   "vs_bare": diff(latents["pipeline"], latents["bare"])}
    res["guidance"] = {"batched_s": med["bare"], "two_calls_s": med["bare two calls"],
                       "ratio": med["bare two calls"] / med["bare"], "steps": args.target_steps,
                       "vs_batched": diff(latents["bare two calls"], latents["bare"])}
    step("loop vs bare diffusers")

    # samplers: DPM-Solver++ at the target steps; DDIM (eta 0, deterministic) at each of sampler_steps[1:];
    # the last DDIM is the reference for the latents and the decoded mel
    samplers = [("dpm-solver", args.sampler_steps[0])] + [("ddim", n) for n in args.sampler_steps[1:]]
    sam = []
    with torch.inference_mode():
        for name, n in samplers:
            if name == "dpm-solver" and n == args.target_steps:
                t, z = med["pipeline"], latents["pipeline"]
            else:
                t, z = timed(pipeline_loop, pipe, cond, uncond, shape, n, name, 0.0)
            sam.append({"sampler": name, "steps": n, "seconds": t, "latents": z, "mel": pipe.decoder.decode(z)})
            step(f"{name} {n}")
    ref = sam[-1]
    for s in sam:
        s["latent_vs_ref"] = diff(s.pop("latents"), ref["latents"]) if s is not ref else None
    for s in sam:
        s["mel_vs_ref"] = diff(s["mel"], ref["mel"])
    for s in sam:
        s.pop("mel")
    ref.pop("latents", None)
    res["samplers"] = {"reference": f"ddim {ref['steps']}", "rows": sam}

    # steps sweep, end to end (fp32); the target steps reuse the runs above
    sweep = []
    for n in args.steps:
        if n == args.target_steps:
            row = precision["fp32"]
        else:
            row, _ = run_e2e(pipe, n)
            row["runs"] = 1
            step(f"{n} steps")
        sweep.append({"steps": n, "total": row["total"], "sampling": row["sampling"],
                      "per_step": row["sampling"] / n, "runs": row["runs"]})
    res["sweep"] = sweep
    res["peak_rss_gb"] = max(r["peak_rss_gb"] for r in precision.values())
    return res
