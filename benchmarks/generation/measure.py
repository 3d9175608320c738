"""How the generation benchmark measures: peak memory, the bf16 probe of this CPU, timing proxies around a
pipeline's components (stage times of one call), and the denoising loops compared (the pipeline's own and a bare
diffusers loop over the same UNet module, scheduler and inputs)."""
from __future__ import annotations

import contextlib
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from reaudio_core.interfaces import Conditioning
from reaudio_core.pipeline import ReAudioPipeline, make_scheduler

from .constants import GUIDANCE, SEED


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
