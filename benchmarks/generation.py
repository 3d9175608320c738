#!/usr/bin/env python
"""Generation benchmark on CPU: where the time of one generation goes, and how close it is to real time.

Sizes (random weights throughout: no pretrained weights are needed or loaded)

  tiny  the ``tiny`` preset (UNet ``tiny``, VAE [8, 16, 16], Griffin-Lim with 4 iterations), 1.28 s clips
  s     reference S sizes (reference sections 2-3): UNet ``s`` (128 x [1, 2, 3, 5], 2 res blocks, head
        width 32), VAE [128, 256, 512] x 2 res blocks with 8 latent channels, HiFi-GAN v1 (16 kHz, hop 160),
        10.24 s clips; built from registry.yaml's parameters with random initialisation

Encoders (``--encoders``): ``minilm`` (default) stands in for CLAP (prompt) and T5 (captions) with the
MiniLM text encoder, and uses a random-init AudioMAE (``base`` at S, ``tiny`` at tiny) for retrieved audio;
the UNet's prompt / caption widths follow the encoders (384 / 384 instead of S's 512 / 1024: the
cross-attention key/value projections of the 150 caption tokens are a negligible part of the UNet).
``reference`` uses random-init CLAP (HTSAT-tiny + RoBERTa-base, 512-d), T5-large (1024-d) and AudioMAE
ViT-B at S (their ``tiny`` shapes at tiny), i.e. exactly the S UNet's widths.

Retrieval runs over a small synthetic database (tone-plus-noise clips, one caption each) with its
neighbour features cached (the documented deployment: generation does not run the caption / audio
encoders on neighbours); the uncached encoder costs are timed separately. One prompt, one candidate,
guidance 2.5, DPM-Solver++ unless stated.

Measured, per size:

* end to end (``ReAudioPipeline.__call__``) at the target steps with per-stage times from the same run
  (each component is wrapped by a timing proxy): prompt encoder, retrieval, caption encoder (the
  unconditional empty captions), neighbour features, UNet (per step and all steps), the rest of the
  sampling loop (scheduler, guidance), VAE decode, vocoder; peak RSS;
* this pipeline's denoising loop (``ReAudioPipeline.sample``) against a bare diffusers loop over the same
  UNet module, scheduler and inputs, interleaved in the same run (target ratio <= 1.05);
* classifier-free guidance as one UNet call on 2B against two calls on B (bare loop);
* DPM-Solver++ at the target steps against DDIM (eta 0) at more steps, each compared with the DDIM
  reference of the most steps (final latents and decoded mel);
* precision: fp32, bf16 autocast around the denoiser (``generation.precision=bf16``), and bf16 autocast
  around the denoiser, VAE and vocoder; time and the output mel's difference from fp32. A CPU without
  native bf16 (AVX512-BF16 / AMX) runs bf16 convolutions tens of times slower than fp32: a probe at the
  start detects that, and ``--bf16 auto`` then skips the bf16 runs beyond size tiny (the report says so);
* a steps sweep (end to end).

The issue's reference numbers (a bare diffusers loop at S, random weights, measured by the issue's author
on a machine it calls this one) are printed beside the measured S numbers.

    python benchmarks/generation.py [--quick] [--sizes tiny,s] [--steps 10,20,50] [--repeats 3]
                                    [--threads 2] [--encoders minilm|reference] [--bf16 auto|on|off]
                                    [--out DIR]
    reaudio bench generation [same flags]

Writes DIR/generation.md (the printed report), DIR/generation.json (every number) and DIR/generation.png
(time per stage, stacked; end to end against steps).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from reaudio_core.config import build, compose  # noqa: E402
from reaudio_core.database import build_database  # noqa: E402
from reaudio_core.interfaces import Conditioning  # noqa: E402
from reaudio_core.io import atomic_write, atomic_write_text  # noqa: E402
from reaudio_core.pipeline import ReAudioPipeline, make_scheduler  # noqa: E402
from reaudio_core.registry import ReaudioError, get_registry  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a dog barks while rain falls on a tin roof"
CAPTIONS = ["a dog barking", "rain falling on a roof", "church bells ringing", "a siren wailing",
            "birds chirping in the morning", "a car engine idling"]
SEED = 0
GUIDANCE = 2.5
TARGET_SECONDS, TARGET_CLIP, TARGET_STEPS, TARGET_RATIO = 10.0, 10.24, 20, 1.05
#: the issue's numbers: a bare diffusers loop at S with random weights, guidance batched, 20 DPM-Solver
#: steps, measured earlier on this machine (2 CPU cores)
ISSUE_REFERENCE = {
    "fp32": {"unet_step": 1.09, "vae": 2.9, "vocoder": 5.7, "total": 30.4},
    "bf16": {"unet_step": 0.50, "vae": 1.1, "vocoder": 5.7, "total": 17.0},
    "peak_rss_gb": 2.3,
}
SIZE_DEFAULTS = {"tiny": {"duration": 1.28, "k": 2}, "s": {"duration": 10.24, "k": 3}}
#: precision variants: (label, generation.precision, bf16 autocast around VAE and vocoder too)
PRECISIONS = [("fp32", "fp32", False), ("bf16 UNet", "bf16", False), ("bf16 UNet+VAE+vocoder", "bf16", True)]


# -- memory ----------------------------------------------------------------------------------------------
def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark of this process (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_gb() -> float:
    """Peak resident set size since the last reset (VmHWM), else since the start (getrusage)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    import resource
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * (1 if sys.platform == "darwin" else 1024) / 1e9


# -- bf16 on this CPU ---------------------------------------------------------------------------------
BF16_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
BF16_SLOW = 1.5  #: bf16/fp32 time of the probe convolution above which bf16 counts as unsupported in hardware


def cpu_flags() -> list[str]:
    """The instruction-set flags that matter for bf16 (from /proc/cpuinfo; empty elsewhere)."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        flags = []
    return [f for f in BF16_FLAGS if f in flags]


@torch.inference_mode()
def bf16_probe() -> dict:
    """Time one small 3x3 convolution and one matmul in fp32 and under bf16 autocast. Without native bf16
    (AVX512-BF16 / AMX) CPU convolutions fall back to a reference path that is orders of magnitude slower."""
    torch.manual_seed(SEED)
    conv, lin = torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.Linear(512, 512)
    x, y = torch.randn(1, 64, 32, 32), torch.randn(256, 512)
    out = {}
    for name, module, inp in (("conv", conv, x), ("linear", lin, y)):
        for prec in ("fp32", "bf16"):
            ctx = bf16_autocast() if prec == "bf16" else contextlib.nullcontext()
            with ctx:
                module(inp)  # warm-up
                t0 = time.perf_counter()
                for _ in range(2):
                    module(inp)
                out[f"{name}_{prec}_s"] = (time.perf_counter() - t0) / 2
        out[f"{name}_ratio"] = out[f"{name}_bf16_s"] / out[f"{name}_fp32_s"]
    try:
        out["mkldnn_bf16"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        out["mkldnn_bf16"] = None
    out["fast"] = out["conv_ratio"] <= BF16_SLOW
    return out


# -- timing proxies ------------------------------------------------------------------------------------
class Clock:
    """Accumulated seconds and call counts per stage label."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, label: str, fn, context=None):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                with (context() if context else contextlib.nullcontext()):
                    out = fn(*args, **kwargs)
                if context is not None and torch.is_tensor(out) and out.is_floating_point():
                    out = out.float()  # the next stage gets float32, as without autocast
                return out
            finally:
                self.seconds[label] += time.perf_counter() - t0
                self.calls[label] += 1
        return timed


class Probe:
    """Stands in for a component: forwards every attribute, times the methods named in ``methods``
    (``{method: stage label}``; ``__call__`` included), optionally inside ``context()``."""

    def __init__(self, target, clock: Clock, methods: dict[str, str], context=None):
        self._target, self._clock, self._methods, self._context = target, clock, methods, context

    def __getattr__(self, name):
        attr = getattr(self._target, name)
        label = self._methods.get(name)
        return self._clock.wrap(label, attr, self._context) if label and callable(attr) else attr

    def __call__(self, *args, **kwargs):
        return self._clock.wrap(self._methods["__call__"], self._target, self._context)(*args, **kwargs)

    def __len__(self):
        return len(self._target)


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@contextlib.contextmanager
def probed(pipe: ReAudioPipeline, clock: Clock, bf16_decode: bool = False):
    """Wrap the pipeline's components in timing proxies for one call; restore them afterwards."""
    slots = ("text_encoder", "caption_encoder", "audio_encoder", "denoiser", "decoder", "vocoder", "database")
    saved = {s: getattr(pipe, s) for s in slots}
    ctx = bf16_autocast if bf16_decode else None
    wrappers = {"text_encoder": ({"embed": "prompt encoder"}, None),
                "caption_encoder": ({"encode_tokens": "caption encoder"}, None),
                "audio_encoder": ({"encode_tokens": "audio encoder"}, None),
                "denoiser": ({"__call__": "unet"}, None),
                "decoder": ({"decode": "vae"}, ctx),
                # a vocoder without a network (Griffin-Lim: complex STFT maths) stays in fp32
                "vocoder": ({"__call__": "vocoder"}, ctx if hasattr(saved["vocoder"], "model") else None),
                "database": ({"search": "retrieval", "features": "neighbour features"}, None)}
    try:
        for slot, (methods, context) in wrappers.items():
            if saved[slot] is not None:
                setattr(pipe, slot, Probe(saved[slot], clock, methods, context))
        pipe.condition = clock.wrap("conditioning", pipe.condition)  # instance attributes shadow the methods
        pipe.sample = clock.wrap("sampling", pipe.sample)
        yield
    finally:
        for slot, value in saved.items():
            setattr(pipe, slot, value)
        for name in ("condition", "sample"):
            pipe.__dict__.pop(name, None)


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


# -- the loops -----------------------------------------------------------------------------------------
def unet_inputs(pipe: ReAudioPipeline, cond: Conditioning) -> dict:
    """The diffusers UNet's keyword arguments for ``cond`` (what the ``unet-ldm`` plugin passes)."""
    d = pipe.denoiser
    kwargs = {"class_labels": cond.prompt, "encoder_hidden_states": None}
    streams = []
    if d.text_dim is not None:
        streams.append((cond.captions, cond.caption_mask))
    if d.audio_dim is not None:
        streams.append((cond.audio, cond.audio_mask))
    for i, (states, mask) in enumerate(streams):
        suffix = "" if i == 0 else "_1"
        kwargs[f"encoder_hidden_states{suffix}"] = states.float()
        kwargs[f"encoder_attention_mask{suffix}"] = None if mask is None else mask.bool()
    return kwargs


@torch.inference_mode()
def bare_loop(pipe: ReAudioPipeline, cond: Conditioning, uncond: Conditioning, shape, steps: int, sampler: str,
              eta: float, batched: bool = True, bf16: bool = False) -> torch.Tensor:
    """The plain diffusers loop: the same diffusers UNet module and scheduler, no validation, no progress bar."""
    unet = pipe.denoiser.model
    scheduler = make_scheduler(pipe.cfg, sampler)
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(SEED)
    latents = torch.randn(shape, generator=g)[None] * scheduler.init_noise_sigma
    both, c, u = unet_inputs(pipe, uncond.cat(cond)), unet_inputs(pipe, cond), unet_inputs(pipe, uncond)
    extra = {"eta": eta, "generator": g} if sampler == "ddim" else {}
    autocast = bf16_autocast if bf16 else contextlib.nullcontext
    for t in scheduler.timesteps:
        if batched:
            x = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            with autocast():
                eps_u, eps_c = unet(x, t, **both).sample.float().chunk(2)
        else:
            x = scheduler.scale_model_input(latents, t)
            with autocast():
                eps_u = unet(x, t, **u).sample.float()
                eps_c = unet(x, t, **c).sample.float()
        latents = scheduler.step(eps_u + GUIDANCE * (eps_c - eps_u), t, latents, **extra).prev_sample
    return latents


def pipeline_loop(pipe: ReAudioPipeline, cond, uncond, shape, steps: int, sampler: str, eta: float) -> torch.Tensor:
    return pipe.sample(cond, uncond, shape, [torch.Generator().manual_seed(SEED)], steps, GUIDANCE, sampler, eta,
                       progress=False)


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.float(), b.float()
    d = (a - b).abs()
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()),
            "rel_l2": float((a - b).norm() / b.norm().clamp(min=1e-12)), "ref_std": float(b.std())}


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
    del pipe
    return res


# -- report --------------------------------------------------------------------------------------------
def f(x, digits=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if x != 0 and abs(x) < 10 ** -digits:
        return f"{x:.1e}"
    return f"{x:.{digits}f}"


def stage_table(results: list[dict]) -> list[str]:
    ref = ISSUE_REFERENCE["fp32"]
    lines = ["| size | stage | seconds | share of end to end | calls | issue reference (bare diffusers, S, fp32) |",
             "|---|---|--:|--:|--:|--:|"]
    for r in results:
        e, info, is_s = r["e2e"], r["info"], r["size"] == "s"
        k, n_tok = info["k"], info["caption_tokens"]
        enc = info["encoders"]
        total = e["total"]
        st = e["stages"]
        rows = [
            (f"prompt encoder ({enc['text_encoder']['name']}, prompt + empty prompt)", st["prompt encoder"], 2, None),
            (f"retrieval (torch, k={k} of {info['database_items']})", st["retrieval"], 1, None),
            (f"caption encoder ({enc['caption_encoder']['name']}, the empty caption x {n_tok} tokens, "
             f"unconditional, in {k} slots)", st["caption encoder"], 1, None),
            ("neighbour features (cached) + assembly", st["neighbour features"], None, None),
            (f"UNet per step (batch 2: guidance batched, latents {'x'.join(map(str, info['latent_shape']))})",
             e["unet_step"], None, ref["unet_step"] if is_s else None),
            (f"UNet, {e['steps']} steps", st["unet"], e["unet_calls"], 20 * ref["unet_step"] if is_s else None),
            ("rest of the sampling loop (scheduler, guidance)", st["loop rest"], None, None),
            ("VAE decode", st["vae"], 1, ref["vae"] if is_s else None),
            (f"vocoder ({info['vocoder']['name']})", st["vocoder"], 1, ref["vocoder"] if is_s else None),
            ("other (prompt checks, reshapes)", st["other"], None, None),
        ]
        for label, sec, calls, issue in rows:
            share = f"{100 * sec / total:.1f}%" if "per step" not in label else "-"
            lines.append(f"| {r['size']} | {label} | {f(sec)} | {share} | {calls if calls is not None else '-'} "
                         f"| {f(issue, 2)} |")
        lines.append(f"| {r['size']} | **end to end** ({info['duration']:g} s clip, {e['steps']} DPM-Solver steps, "
                     f"median of {e['runs']}) | **{f(total)}** | 100% | 1 | {f(ref['total'], 1) if is_s else '-'} |")
        lines.append(f"| {r['size']} | real-time factor (clip seconds / end-to-end seconds) | "
                     f"{info['duration'] / total:.2f} | - | - | {f(TARGET_CLIP / ref['total'], 2) if is_s else '-'} |")
        lines.append(f"| {r['size']} | peak RSS, GB (end to end, fp32) | {e['peak_rss_gb']:.2f} | - | - "
                     f"| {f(ISSUE_REFERENCE['peak_rss_gb'], 1) if is_s else '-'} |")
        for name, sec in r["uncached"].items():
            lines.append(f"| {r['size']} | not in the run above: {name} on the {k} neighbours (uncached"
                         f"{', audio files read' if name == 'audio encoder' else ''}) | {f(sec)} | - | 1 | - |")
    return lines


def loop_table(results: list[dict]) -> list[str]:
    lines = ["| size | sampler | steps | pipeline s | bare diffusers s | ratio | target | max abs latent diff | runs |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in results:
        lp = r["loop"]
        ok = "met" if lp["ratio"] <= TARGET_RATIO else "NOT met"
        lines.append(f"| {r['size']} | {lp['sampler']} | {lp['steps']} | {f(lp['pipeline_s'])} | {f(lp['bare_s'])} "
                     f"| {lp['ratio']:.3f} | <= {TARGET_RATIO} ({ok}) | {f(lp['vs_bare']['max_abs'])} "
                     f"| {lp['runs']} |")
    return lines


def guidance_table(results: list[dict]) -> list[str]:
    lines = ["| size | guidance | s per step | loop s | ratio to batched | max abs latent diff to batched |",
             "|---|---|--:|--:|--:|--:|"]
    for r in results:
        g = r["guidance"]
        lines.append(f"| {r['size']} | batched (one UNet call on 2B) | {f(g['batched_s'] / g['steps'])} "
                     f"| {f(g['batched_s'])} | 1.000 | - |")
        lines.append(f"| {r['size']} | two UNet calls on B | {f(g['two_calls_s'] / g['steps'])} "
                     f"| {f(g['two_calls_s'])} | {g['ratio']:.3f} | {f(g['vs_batched']['max_abs'])} |")
    return lines


def sampler_table(results: list[dict]) -> list[str]:
    lines = ["| size | sampler | steps | seconds | latents rel. L2 diff vs ref | mel max abs diff vs ref "
             "| mel mean abs diff vs ref |", "|---|---|--:|--:|--:|--:|--:|"]
    for r in results:
        for s in r["samplers"]["rows"]:
            is_ref = s["latent_vs_ref"] is None
            name = f"{s['sampler']}{' (reference)' if is_ref else ''}"
            lat = "-" if is_ref else f(s["latent_vs_ref"]["rel_l2"])
            mel = s["mel_vs_ref"]
            lines.append(f"| {r['size']} | {name} | {s['steps']} | {f(s['seconds'])} | {lat} "
                         f"| {'-' if is_ref else f(mel['max_abs'])} | {'-' if is_ref else f(mel['mean_abs'])} |")
    return lines


def precision_table(results: list[dict]) -> list[str]:
    lines = ["| size | precision | UNet s/step | VAE s | vocoder s | end to end s | mel max abs diff vs fp32 "
             "| mel mean abs diff vs fp32 | fp32 mel std | peak RSS GB "
             "| issue reference (UNet/step, VAE, vocoder, total) |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    for r in results:
        for label, row in r["precision"].items():
            ref = None
            if r["size"] == "s" and label in ("fp32", "bf16 UNet+VAE+vocoder"):
                x = ISSUE_REFERENCE["fp32" if label == "fp32" else "bf16"]
                ref = f"{x['unet_step']:.2f}, {x['vae']:.1f}, {x['vocoder']:.1f}, {x['total']:.1f}"
            mel = row.get("mel_vs_fp32")
            lines.append(f"| {r['size']} | {label} | {f(row['unet_step'])} | {f(row['stages']['vae'])} "
                         f"| {f(row['stages']['vocoder'])} | {f(row['total'])} "
                         f"| {f(mel['max_abs']) if mel else '-'} | {f(mel['mean_abs']) if mel else '-'} "
                         f"| {f(r['precision']['fp32']['mel_std'])} | {row['peak_rss_gb']:.2f} | {ref or '-'} |")
        if r.get("precision_skipped"):
            ref = ISSUE_REFERENCE["bf16"] if r["size"] == "s" else None
            ref = f"{ref['unet_step']:.2f}, {ref['vae']:.1f}, {ref['vocoder']:.1f}, {ref['total']:.1f}" if ref else "-"
            lines.append(f"| {r['size']} | bf16 (UNet; UNet+VAE+vocoder) | {r['precision_skipped']} "
                         f"| | | | | | | | {ref} |")
    return lines


def sweep_table(results: list[dict]) -> list[str]:
    lines = ["| size | DPM-Solver steps | end to end s | sampling s | sampling s per step | real-time factor | runs |",
             "|---|--:|--:|--:|--:|--:|--:|"]
    for r in results:
        for s in r["sweep"]:
            lines.append(f"| {r['size']} | {s['steps']} | {f(s['total'])} | {f(s['sampling'])} | {f(s['per_step'])} "
                         f"| {r['info']['duration'] / s['total']:.2f} | {s['runs']} |")
    return lines


def target_lines(results: list[dict], args) -> tuple[list[str], dict]:
    s = next((r for r in results if r["size"] == "s"), None)
    if s is None:
        return [f"- the target (a {TARGET_CLIP} s clip at S, {TARGET_STEPS} DPM-Solver steps, <= {TARGET_SECONDS:g} s "
                f"end to end on 2 CPU cores) is measured at size s, which this run did not include."], {"met": None}
    status = {}
    lines = []
    conditions = []
    if s["info"]["duration"] != TARGET_CLIP:
        conditions.append(f"clip {s['info']['duration']:g} s instead of {TARGET_CLIP}")
    if args.target_steps != TARGET_STEPS:
        conditions.append(f"{args.target_steps} steps instead of {TARGET_STEPS}")
    if args.threads != 2:
        conditions.append(f"{args.threads} threads instead of 2")
    for label, row in s["precision"].items():
        met = row["total"] <= TARGET_SECONDS if not conditions else None
        status[label] = {"seconds": row["total"], "met": met}
        verdict = {True: "MET", False: "NOT MET", None: "OFF-TARGET RUN"}[met]
        caveat = f" (not the target's conditions: {'; '.join(conditions)})" if conditions else ""
        st = row["stages"]
        parts = [("UNet", st["unet"]), ("VAE", st["vae"]), ("vocoder", st["vocoder"]),
                 ("conditioning", row["conditioning"]), ("scheduler and rest", st["loop rest"] + st["other"])]
        where = ", ".join(f"{name} {sec:.2f} s ({100 * sec / row['total']:.0f}%)" for name, sec in parts)
        mel = row.get("mel_vs_fp32")
        quality = (f"; output mel vs fp32: max abs {mel['max_abs']:.3g}, mean abs {mel['mean_abs']:.3g} "
                   f"(fp32 mel std {mel['ref_std']:.3g})") if mel else ""
        lines.append(f"- **{verdict}** ({label}): {row['total']:.2f} s end to end for a "
                     f"{s['info']['duration']:g} s clip against the {TARGET_SECONDS:g} s target "
                     f"(real-time factor {s['info']['duration'] / row['total']:.2f}){caveat}. Time goes to: {where}"
                     f"{quality}.")
    if s.get("precision_skipped"):
        lines.append(f"- bf16 at size s: {s['precision_skipped']}.")
    ref = ISSUE_REFERENCE
    lines.append(f"- Issue reference (bare diffusers loop, random weights, measured by the issue's author): fp32 "
                 f"{ref['fp32']['total']} s (UNet {ref['fp32']['unet_step']} s/step, VAE {ref['fp32']['vae']} s, "
                 f"HiFi-GAN {ref['fp32']['vocoder']} s); bf16 autocast {ref['bf16']['total']} s (UNet "
                 f"{ref['bf16']['unet_step']} s/step, VAE {ref['bf16']['vae']} s, HiFi-GAN {ref['bf16']['vocoder']} s);"
                 f" peak RSS {ref['peak_rss_gb']} GB.")
    best = min(s["precision"].values(), key=lambda r: r["total"])
    st = best["stages"]
    fixed = best["total"] - st["unet"] - st["loop rest"]
    per_step = (st["unet"] + st["loop rest"]) / best["steps"]
    budget = (TARGET_SECONDS - fixed) / per_step if per_step > 0 else float("inf")
    lines.append(f"- At the fastest setting measured ({best['label']}): {fixed:.2f} s outside the denoising loop and "
                 f"{per_step:.3f} s per step, so {max(0.0, budget):.1f} steps would fit in {TARGET_SECONDS:g} s"
                 f"{' (at these off-target conditions)' if conditions else ''}.")
    status["met"] = None if conditions else any(v["met"] for v in status.values())
    return lines, status


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    parts = [("conditioning", "#8c8c8c"), ("UNet", "#1f77b4"), ("loop rest", "#aec7e8"), ("VAE", "#ff7f0e"),
             ("vocoder", "#2ca02c"), ("other", "#d62728")]
    fig, axes = plt.subplots(len(results), 2, figsize=(13, 4.0 * len(results)), squeeze=False,
                             gridspec_kw={"width_ratios": [2.2, 1]})
    for (ax, ax2), r in zip(axes, results):
        bars = []
        for label, row in r["precision"].items():
            st = row["stages"]
            bars.append((label, {"conditioning": row["conditioning"], "UNet": st["unet"],
                                 "loop rest": st["loop rest"], "VAE": st["vae"], "vocoder": st["vocoder"],
                                 "other": st["other"]}))
        if r["size"] == "s":
            for prec, name in (("fp32", "issue ref. fp32 (bare)"), ("bf16", "issue ref. bf16 (bare)")):
                x = ISSUE_REFERENCE[prec]
                unet = 20 * x["unet_step"]
                bars.append((name, {"conditioning": 0.0, "UNet": unet, "loop rest": 0.0, "VAE": x["vae"],
                                    "vocoder": x["vocoder"],
                                    "other": max(0.0, x["total"] - unet - x["vae"] - x["vocoder"])}))
        ys = np.arange(len(bars))
        left = np.zeros(len(bars))
        for part, colour in parts:
            vals = np.array([b[1][part] for b in bars])
            ax.barh(ys, vals, left=left, color=colour, label=part)
            left += vals
        for y, total in zip(ys, left):
            ax.text(total, y, f" {total:.2f} s", va="center", fontsize=8)
        ax.set_yticks(ys, [b[0] for b in bars], fontsize=8)
        ax.invert_yaxis()
        if r["size"] == "s":
            ax.axvline(TARGET_SECONDS, color="k", ls="--", lw=1)
            ax.text(TARGET_SECONDS, 0.02, f" target {TARGET_SECONDS:g} s", fontsize=8,
                    transform=ax.get_xaxis_transform())
        ax.set_xlim(0, left.max() * 1.18)
        ax.set_xlabel("seconds, end to end")
        ax.set_title(f"{r['size']}: {r['info']['duration']:g} s clip, {r['e2e']['steps']} DPM-Solver steps",
                     fontsize=10)
        ax.legend(fontsize=7, ncol=len(parts), loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)
        sw = r["sweep"]
        ax2.plot([s["steps"] for s in sw], [s["total"] for s in sw], "o-", label="end to end")
        ax2.plot([s["steps"] for s in sw], [s["sampling"] for s in sw], "s--", label="sampling loop")
        if r["size"] == "s":
            ax2.axhline(TARGET_SECONDS, color="k", ls="--", lw=1)
        ax2.set_xlabel("DPM-Solver steps")
        ax2.set_ylabel("seconds (fp32)")
        ax2.set_title(f"{r['size']}: steps sweep", fontsize=10)
        ax2.grid(True, alpha=0.3)
        ax2.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


# -- main ----------------------------------------------------------------------------------------------
def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="reaudio bench generation", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny size only, 2 steps, 0.64 s clip, 1 repeat, samplers 2/4/8 steps")
    p.add_argument("--sizes", default=None, help="comma-separated sizes: tiny, s (default tiny,s; quick: tiny)")
    p.add_argument("--steps", type=int_list, default=None,
                   help="steps sweep, end to end (default 10,20,50; quick 1,2)")
    p.add_argument("--target-steps", type=int, default=None,
                   help=f"DPM-Solver steps of the main measurements (default {TARGET_STEPS}; quick 2)")
    p.add_argument("--sampler-steps", type=int_list, default=None,
                   help="DPM-Solver steps, then DDIM steps to compare; the last DDIM is the reference "
                        "(default 20,50,200; quick 2,4,8)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement, median kept (default 3; "
                                                             "quick 1)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--duration", type=float, default=None,
                   help="clip seconds for every size (default tiny 1.28, s 10.24; quick 0.64)")
    p.add_argument("--encoders", choices=["minilm", "reference"], default="minilm",
                   help="minilm: MiniLM for prompt and captions (default); reference: random-init CLAP, T5 and "
                        "AudioMAE at the reference sizes")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast variants: auto (default) runs them where the CPU has fast bf16 (probed at the "
                        "start) and at size tiny; on: always (hours at S on a CPU without AVX512-BF16/AMX); off: never")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default benchmarks/results/, with --quick benchmarks/results/quick/)")
    args = p.parse_args(argv)
    q = args.quick
    args.sizes = [s.strip() for s in (args.sizes or ("tiny" if q else "tiny,s")).split(",") if s.strip()]
    for s in args.sizes:
        if s not in SIZE_DEFAULTS:
            p.error(f"unknown size {s!r}: choose from {', '.join(SIZE_DEFAULTS)}")
    args.target_steps = args.target_steps or (2 if q else TARGET_STEPS)
    args.steps = args.steps or ([1, 2] if q else [10, 20, 50])
    args.sampler_steps = args.sampler_steps or ([2, 4, 8] if q else [TARGET_STEPS, 50, 200])
    if len(args.sampler_steps) < 2:
        p.error("--sampler-steps needs DPM-Solver steps and at least one DDIM step count")
    args.repeats = args.repeats or (1 if q else 3)
    args.duration = args.duration or (0.64 if q else None)
    if args.repeats < 1 or args.threads < 1 or args.target_steps < 1:
        p.error("--repeats, --threads and --target-steps must be >= 1")
    if args.duration is not None and args.duration <= 0:
        p.error("--duration must be > 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(previous_threads)


def run(args) -> dict:
    out = args.out or (REPO / "benchmarks" / "results" / ("quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    started, load = time.perf_counter(), os.getloadavg()
    args.cpu_flags, args.bf16_probe = cpu_flags(), bf16_probe()
    results = []
    with tempfile.TemporaryDirectory(prefix="reaudio-bench-gen-") as work, \
            tqdm(total=sum(tasks(s, args) for s in args.sizes), file=sys.stderr, unit="task") as bar:
        for size in args.sizes:
            results.append(bench_size(size, args, Path(work), bar))
    total = time.perf_counter() - started
    t_lines, status = target_lines(results, args)

    cpu = platform.processor() or "unknown CPU"
    if Path("/proc/cpuinfo").exists():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    import diffusers
    import transformers
    versions = f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}"
    stand_in = ("MiniLM (all-MiniLM-L6-v2, pretrained) stands in for CLAP (prompt) and T5 (captions); AudioMAE "
                "(retrieved audio) is random-init" if args.encoders == "minilm" else
                "CLAP, T5 and AudioMAE are random-init at the reference sizes (tiny shapes at size tiny)")
    md = [f"# Generation benchmark{' (--quick: smoke-test sizes, numbers not meaningful)' if args.quick else ''}", "",
          f"Machine: {cpu}, {os.cpu_count()} CPUs, {args.threads} torch threads; {versions}. Total run time "
          f"{total / 60:.1f} min; load average {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
          f"(other work on the machine slows every timing).", "",
          f"CPU flags relevant to bf16: {', '.join(args.cpu_flags) or 'none found'}; oneDNN bf16 support reported by "
          f"torch: {args.bf16_probe['mkldnn_bf16']}. Probe under bf16 autocast against fp32: a 3x3 convolution "
          f"(64 channels, 32x32) {args.bf16_probe['conv_ratio']:.2f}x the fp32 time, a 256x512x512 matmul "
          f"{args.bf16_probe['linear_ratio']:.2f}x (`--bf16 {args.bf16}`).", "",
          f"Random weights everywhere (no pretrained weights exist on this machine): the UNet, VAE and vocoder are "
          f"built from registry.yaml's parameters with random initialisation. Encoders: {stand_in}. Retrieval: a "
          f"synthetic {len(CAPTIONS)}-item database (tone-plus-noise clips) with cached neighbour features. One "
          f"prompt, one candidate, guidance {GUIDANCE}, DPM-Solver++ (2M), medians of {args.repeats} run(s) "
          f"unless stated.", ""]
    for r in results:
        i = r["info"]
        params = ", ".join(f"{k} {v:.1f} M" for k, v in i["params_m"].items())
        enc = ", ".join(f"{k} {v['name']} ({v['dim'] if k == 'text_encoder' else v['token_dim']}-d)"
                        for k, v in i["encoders"].items())
        md.append(f"- **{r['size']}**: {i['duration']:g} s clip -> latents {'x'.join(map(str, i['latent_shape']))}; "
                  f"parameters: {params}; {enc}; vocoder {i['vocoder']['name']}; built in {i['build_s']:.1f} s.")
    md += ["", "## Target", ""] + t_lines
    md += ["", f"## Time per stage (fp32, end to end at {args.target_steps} steps, one run's breakdown)", "",
           "Stages are timed inside one `ReAudioPipeline.__call__` (each component wrapped in a timing proxy). The "
           "rows marked 'not in the run above' are what the caption / audio encoders cost when neighbour features "
           "are not cached in the database.", ""] + stage_table(results)
    md += ["", "## Denoising loop: this pipeline against a bare diffusers loop", "",
           "`ReAudioPipeline.sample` against a plain loop over the same diffusers UNet module, scheduler and inputs "
           "(guidance batched), interleaved in the same run; max abs latent diff 0 means bit-identical.", ""] + \
        loop_table(results)
    md += ["", "## Classifier-free guidance: one batched UNet call against two calls (bare loop)", ""] + \
        guidance_table(results)
    md += ["", "## Samplers", "",
           "DPM-Solver++ against DDIM with eta 0 (deterministic; the original code samples with eta 1), same initial "
           "noise; differences are to the DDIM run with the most steps. With random weights these measure how "
           "closely the solvers agree on the same probability-flow ODE, not audio quality.", ""] + \
        sampler_table(results)
    md += ["", "## Precision", "",
           "`bf16 UNet` is `generation.precision=bf16` (CPU autocast around the denoiser); `bf16 UNet+VAE+vocoder` "
           "also autocasts the VAE decode and the vocoder (as the issue's bf16 reference did; a vocoder without a "
           "network, Griffin-Lim, stays fp32). Differences are to the fp32 run with the same seed.", ""] + \
        precision_table(results)
    md += ["", "## Steps sweep (fp32, end to end)", ""] + sweep_table(results)
    md += ["", "![time per stage and steps sweep](generation.png)", ""]
    text = "\n".join(md)
    print(text)
    atomic_write_text(out / "generation.md", text)
    plot(results, out / "generation.png")
    result = {"results": results, "targets": status, "cpu_flags": args.cpu_flags, "bf16_probe": args.bf16_probe,
              "issue_reference": ISSUE_REFERENCE, "threads": args.threads, "repeats": args.repeats,
              "target_steps": args.target_steps, "encoders": args.encoders, "bf16": args.bf16, "quick": args.quick,
              "total_s": total, "load_average": [load[0], os.getloadavg()[0]], "versions": versions, "cpu": cpu}
    atomic_write_text(out / "generation.json", json.dumps(result, indent=1, default=str))
    print(f"# wrote {out / 'generation.md'}, {out / 'generation.png'}, {out / 'generation.json'} in "
          f"{total / 60:.1f} min", file=sys.stderr)
    return result


if __name__ == "__main__":
    try:
        main()
    except ReaudioError as exc:
        raise SystemExit(f"error: {exc}") from None
