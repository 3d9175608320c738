"""Denoiser ``unet-ldm``: the AudioLDM / Re-AudioLDM UNet (reference section 3) on diffusers.

Architecture
------------
``block_out_channels = model_channels x [1, 2, 3, 5]`` (S 128, M 192, L 256; ``tiny`` 32 for tests),
``layers_per_block`` res blocks per level, a x2 downsampling between levels (x8 in all), attention at
the three deepest levels (downsampling factors 2, 4, 8) and in the middle block, 32-group GroupNorm,
in/out channels 8 (the VAE latents).

* Prompt condition ("FiLM"): ``Conditioning.prompt [B, prompt_dim]`` -> ``Linear(prompt_dim, 4*C)``
  (diffusers ``class_embed_type="simple_projection"``), concatenated with the time embedding
  (``class_embeddings_concat=True``); every ResBlock's embedding projection reads the concatenation.
* No retrieval stream (``text_dim = audio_dim = None``): diffusers ``UNet2DConditionModel``, AudioLDM's
  layout: each attention layer is a transformer block whose second attention attends to the hidden
  states themselves (``cross_attention_dim`` = the level's width, no ``encoder_hidden_states``), exactly
  what AudioLDM's ``SpatialTransformer`` does without a context.
* Retrieval streams: diffusers ``AudioLDM2UNet2DConditionModel`` with ``cross_attention_dim =
  [[None, text_dim, audio_dim]] * 4`` (streams that are ``None`` left out): at every attention level
  a pure self-attention transformer (``None``, the AudioLDM layer above, same weights) followed by one
  cross-attention transformer per stream, in the order captions, audio. ``Conditioning.captions``
  (with ``caption_mask``) feeds the first stream and ``Conditioning.audio`` (with ``audio_mask``) the
  second; masks are ``[B, L]`` bool, ``True`` = attend (diffusers' ``encoder_attention_mask`` /
  ``encoder_attention_mask_1``; a masked key gets a -10000 bias). A stream given in the
  ``Conditioning`` that the model was not built with is ignored.
* Frequency maps (``freq_channels``, default 0 = AudioLDM's UNet): that many fixed maps
  (:func:`frequency_maps`, a cosine of the latent row index) are concatenated to the latents before
  ``conv_in``, so every position knows its frequency row. Weights without them load into a model with
  them with zero ``conv_in`` weights for the maps (the same output until trained). Not part of the
  paper; an option of this package (docs/results.md, section 1, says what it changed).
* Guidance input (``guidance_embedding``, default 0 = none): a guidance-distilled student
  (``reaudio distill``; Meng et al. 2023, "On Distillation of Guided Diffusion Models") reads the
  classifier-free guidance scale ``Conditioning.guidance [B]``: a sinusoidal embedding of it
  (:func:`guidance_features`, this many features) goes through diffusers' ``time_cond_proj_dim`` projection
  and is added to the timestep features. Weights without it load with a zero projection (the teacher's
  conditional output until trained).

Head convention (by default the original code's): every attention layer of a level with ``c`` channels has
``c // head_width`` heads of width ``head_width`` (32 for S and M, 64 for L, 16 for ``tiny``). For S
that is 8, 12 and 20 heads at the three attention levels. diffusers' published AudioLDM configs use 8
heads everywhere instead (same weight shapes, different attention maths at the wider levels); a
diffusers folder is loaded with this module's convention, with a warning when its config says otherwise.
``num_heads`` (default ``null`` = the convention above) chooses the other one: an integer is that many
heads at every attention level, a list one count per level (diffusers' ``attention_head_dim``, which
diffusers' UNet2DConditionModel reads as a head count); ``num_heads: 8`` runs a diffusers AudioLDM folder
exactly as diffusers does (docs/checkpoints.md).

Weights (``checkpoint``, or :meth:`UNetLDM.from_pretrained`)
------------------------------------------------------------
* a directory written by :meth:`UNetLDM.save_pretrained` (``config.json`` = constructor keywords,
  ``model.safetensors``);
* a diffusers folder: a pipeline root with ``model_index.json`` and ``unet/``, or the ``unet/`` folder
  (``UNet2DConditionModel`` or ``AudioLDM2UNet2DConditionModel`` config + ``diffusion_pytorch_model
  .safetensors`` / ``.bin``); its config defines the sizes;
* an original AudioLDM Lightning ``.ckpt`` (``state_dict`` with ``model.diffusion_model.*`` in the
  openaimodel naming and the flattened EMA copy ``model_ema.*``, preferred when complete), converted by
  :func:`convert_audioldm_unet_state_dict`; its sizes are read from the weights.

A retrieval model given AudioLDM weights (any of the above without stream layers) is *initialised*
from them (:func:`inflate_audioldm_state_dict`): every AudioLDM weight goes to the same layer, the
self-attention transformer of each level carries AudioLDM's transformer, and each new stream
transformer ends in a zero-initialised output projection, so the model computes exactly AudioLDM's
output until trained. :meth:`UNetLDM.retrieval_parameters` names the stream layers' parameters
(``training.trainable: retrieval`` trains only them; docs/retrofit.md). Loading never executes code
(safetensors, or ``torch.load(weights_only=True)``). Reading the sources, the key conversion and the
inflation live in :mod:`reaudio_plugins._audioldm_unet_ckpt` (their names are re-exported here).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from reaudio_core import Conditioning, Denoiser, Pretrained, ReaudioError, hookimpl

from ._audioldm_unet_ckpt import (BASELINE_CLASS, CONFIG_FILE, NORM_GROUPS, RETRIEVAL_CLASS, UnetSource,
                                  _arch_from_diffusers_config, _attention_stride, _diffusers_folder,
                                  convert_audioldm_unet_state_dict, inflate_audioldm_state_dict,
                                  read_unet_checkpoint)
from ._audioldm_unet_ckpt import audioldm_key, ema_key, infer_audioldm_arch  # noqa: F401 (re-exported)
from ._ckpt import load_strict, read_json

log = logging.getLogger("reaudio")

CHANNEL_MULT = (1, 2, 3, 5)
#: size -> (model_channels, layers_per_block, head_width)
SIZES = {"tiny": (32, 1, 16), "s": (128, 2, 32), "m": (192, 2, 32), "l": (256, 2, 64)}
PARAMS = ("size", "block_out_channels", "layers_per_block", "head_width", "num_heads", "prompt_dim", "text_dim",
          "audio_dim", "in_channels", "freq_channels", "guidance_embedding", "checkpoint", "device")


def default_head_width(model_channels: int) -> int:
    """The original configs' head width for a base width (32 for S/M, 64 for L, 16 for tiny)."""
    for ch, _, width in SIZES.values():
        if ch == model_channels:
            return width
    return 64 if isinstance(model_channels, int) and model_channels >= 256 else 32


def attention_heads(block_out_channels, head_width: int) -> list[int]:
    """Heads per level under this module's convention: ``channels // head_width``."""
    return [max(1, int(c) // int(head_width)) for c in block_out_channels]


def diffusers_unet_config(*, block_out_channels, layers_per_block, head_width, prompt_dim, in_channels,
                          freq_channels=0, guidance_embedding=0, stream_dims=(), num_heads=None) -> tuple[str, dict]:
    """``(class name, constructor kwargs)`` of the diffusers UNet for these sizes; ``stream_dims`` are the
    widths of the retrieval streams in order (empty = AudioLDM's no-retrieval UNet); ``freq_channels``
    position maps are read beside the ``in_channels`` latent channels (:func:`frequency_maps`); ``num_heads``
    (one count per level) replaces the ``channels // head_width`` convention."""
    chans = [int(c) for c in block_out_channels]
    levels = len(chans)
    common = dict(
        sample_size=None, in_channels=int(in_channels) + int(freq_channels), out_channels=int(in_channels),
        flip_sin_to_cos=True, freq_shift=0, down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (levels - 1),
        up_block_types=["CrossAttnUpBlock2D"] * (levels - 1) + ["UpBlock2D"], block_out_channels=chans,
        layers_per_block=int(layers_per_block), norm_num_groups=NORM_GROUPS, norm_eps=1e-5,
        attention_head_dim=attention_heads(chans, head_width) if num_heads is None else [int(h) for h in num_heads],
        use_linear_projection=False,
        class_embed_type="simple_projection", projection_class_embeddings_input_dim=int(prompt_dim),
        class_embeddings_concat=True, time_cond_proj_dim=int(guidance_embedding) or None)
    if not stream_dims:
        return BASELINE_CLASS, {**common, "cross_attention_dim": chans}
    return RETRIEVAL_CLASS, {**common, "cross_attention_dim": [[None, *map(int, stream_dims)] for _ in chans]}


def guidance_features(scale: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, n]`` sinusoidal features of guidance scales ``[B]``: diffusers' timestep embedding of ``100 * scale``
    (so that the usual 1-10 spread over the frequencies as timesteps do), ``sin`` then ``cos``."""
    from diffusers.models.embeddings import get_timestep_embedding
    return get_timestep_embedding(100.0 * scale.float(), n, flip_sin_to_cos=False, downscale_freq_shift=0)


def frequency_maps(n: int, T: int, F: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """``[n, T, F]`` fixed maps that tell each latent position its frequency row: map ``j`` is
    ``cos(pi * (j + 1) * (f + 0.5) / F)`` for row ``f`` (constant along time). Convolutions are
    shift-equivariant along frequency, so without them a position knows its pitch only from the zero
    padding at the edges; with them a query can read the part of a retrieved-audio token (the ``vae-latent``
    tokens flatten channels x frequency rows) that belongs to its own row."""
    pos = (torch.arange(F, dtype=torch.float64) + 0.5) / F
    maps = torch.stack([torch.cos(torch.pi * (j + 1) * pos) for j in range(n)])  # [n, F]
    return maps[:, None, :].expand(n, T, F).to(device=device, dtype=dtype)


def build_unet(**arch) -> torch.nn.Module:
    """The diffusers module for :func:`diffusers_unet_config`'s keywords."""
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.audioldm2.modeling_audioldm2 import AudioLDM2UNet2DConditionModel
    name, kwargs = diffusers_unet_config(**arch)
    cls = UNet2DConditionModel if name == BASELINE_CLASS else AudioLDM2UNet2DConditionModel
    return cls(**kwargs)


# -- the component -----------------------------------------------------------------------------------------
class UNetLDM(Pretrained, Denoiser):
    """AudioLDM (no retrieval) or Re-AudioLDM (caption and/or audio streams) UNet; see the module docstring.

    ``size``: ``tiny`` | ``s`` | ``m`` | ``l``; ``block_out_channels`` / ``layers_per_block`` / ``head_width``
    (``null`` = the size's) override it. ``prompt_dim``: prompt embedding width (512 CLAP, 384 MiniLM).
    ``text_dim`` / ``audio_dim``: widths of the retrieved caption states / audio tokens, ``null`` = no such
    stream. ``checkpoint``: weights to load (sizes come from it when it states them). ``num_heads``: ``null`` =
    ``channels // head_width`` heads (the original code's), else an integer or one count per level (diffusers').
    """

    def __init__(self, *, size, block_out_channels, layers_per_block, head_width, num_heads, prompt_dim, text_dim,
                 audio_dim, in_channels, freq_channels, guidance_embedding, checkpoint, device):
        if size not in SIZES:
            raise ReaudioError(f"unet-ldm: unknown size {size!r}; known: {', '.join(SIZES)}")
        base, size_layers, size_width = SIZES[size]
        arch = {"block_out_channels": [base * m for m in CHANNEL_MULT] if block_out_channels is None
                else list(block_out_channels),
                "layers_per_block": size_layers if layers_per_block is None else layers_per_block,
                "prompt_dim": prompt_dim, "in_channels": in_channels, "freq_channels": freq_channels,
                "guidance_embedding": guidance_embedding}
        streams = [d for d in (text_dim, audio_dim) if d is not None]
        source = read_unet_checkpoint(checkpoint) if checkpoint else None
        if source is not None:
            for key in ("freq_channels", "guidance_embedding"):  # weights without them fit a model with them
                if not source.arch.get(key):
                    source.arch.pop(key, None)
            changed = {k: v for k, v in source.arch.items() if arch.get(k) != v}
            if changed:
                log.info("unet-ldm: sizes taken from %s: %s", checkpoint, changed)
            arch.update(source.arch)
            if head_width is None:
                head_width = source.head_width or self._folder_head_width(source, arch["block_out_channels"])
            if num_heads is None:
                num_heads = source.num_heads
            if source.streams and source.streams != streams:
                raise ReaudioError(f"unet-ldm: {checkpoint} has retrieval streams of widths {source.streams}, this "
                                   f"model is configured with text_dim={text_dim}, audio_dim={audio_dim}; set them "
                                   "to the checkpoint's (captions first, then audio)")
        if head_width is None:
            head_width = size_width if block_out_channels is None and source is None else \
                default_head_width(next(iter(arch["block_out_channels"]), 0))  # a bad list is reported below
        arch["head_width"] = head_width
        self._validate(arch, streams)
        arch = {"block_out_channels": [int(c) for c in arch["block_out_channels"]],
                "layers_per_block": int(arch["layers_per_block"]), "head_width": int(arch["head_width"]),
                "prompt_dim": int(arch["prompt_dim"]), "in_channels": int(arch["in_channels"]),
                "freq_channels": int(arch["freq_channels"]), "guidance_embedding": int(arch["guidance_embedding"])}
        self.num_heads = self._heads_per_level(num_heads, arch["block_out_channels"])
        if source is not None and source.heads is not None and self.num_heads is None:
            mine = attention_heads(arch["block_out_channels"], arch["head_width"])
            if source.heads[1:] != mine[1:]:
                log.warning("unet-ldm: %s's config has %s attention heads per level; using this module's convention "
                            "(channels / head_width %d = %s heads, the original AudioLDM code's)",
                            checkpoint, source.heads, arch["head_width"], mine)
                log.warning("unet-ldm: set denoiser.params.num_heads=%s to run it as diffusers does "
                            "(docs/checkpoints.md)", source.heads[-1] if len(set(source.heads)) == 1 else source.heads)
        self.arch = arch
        self.text_dim = None if text_dim is None else int(text_dim)
        self.audio_dim = None if audio_dim is None else int(audio_dim)
        self.prompt_dim = arch["prompt_dim"]
        self.in_channels = arch["in_channels"]
        self.freq_channels = arch["freq_channels"]
        self.guidance_input = arch["guidance_embedding"] > 0
        self.downsample = 2 ** (len(arch["block_out_channels"]) - 1)
        self.size = size
        self.model = build_unet(**arch, stream_dims=[d for d in (self.text_dim, self.audio_dim) if d is not None],
                                num_heads=self.num_heads)
        self.loaded_from = None
        if source is not None:
            self._load(source, checkpoint)
            self.loaded_from = str(checkpoint)
        self.device = torch.device(device)
        self.model.to(self.device).eval()

    # -- construction helpers ------------------------------------------------------------------------------
    @staticmethod
    def _folder_head_width(source: UnetSource, chans) -> int | None:
        """A diffusers folder's heads as one head width, when they follow the channels/width convention."""
        if not source.heads:
            return None
        pairs = list(zip(chans[1:], source.heads[1:]))  # attention levels only
        if not all(h > 0 and c % h == 0 for c, h in pairs):
            return None
        widths = {c // h for c, h in pairs}
        return widths.pop() if len(widths) == 1 else None

    @staticmethod
    def _heads_per_level(num_heads, chans) -> list[int] | None:
        """``num_heads`` (null, an integer, or one count per level) as one count per level, checked to divide each
        attention level's width."""
        if num_heads is None:
            return None
        heads = [num_heads] * len(chans) if isinstance(num_heads, int) else num_heads
        if not isinstance(heads, (list, tuple)) or len(heads) != len(chans) or \
                any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in heads):
            raise ReaudioError(f"unet-ldm: num_heads must be null, a positive integer or {len(chans)} positive "
                               f"integers (one per level), got {num_heads!r}")
        bad = [(c, h) for c, h in zip(chans[1:], heads[1:]) if c % h]
        if bad:
            raise ReaudioError(f"unet-ldm: num_heads must divide each attention level's width; (width, heads) {bad} "
                               "do not")
        return [int(h) for h in heads]

    @staticmethod
    def _validate(arch: dict, streams) -> None:
        chans = arch["block_out_channels"]
        if not isinstance(chans, (list, tuple)) or len(chans) < 2 or \
                any(isinstance(c, bool) or not isinstance(c, int) or c <= 0 for c in chans):
            raise ReaudioError(f"unet-ldm: block_out_channels must list at least two positive widths, got {chans!r}")
        bad = [c for c in chans if c % NORM_GROUPS]
        if bad:
            raise ReaudioError(f"unet-ldm: every block_out_channels entry must be a multiple of {NORM_GROUPS} "
                               f"(GroupNorm groups); {bad} are not")
        for key in ("layers_per_block", "head_width", "prompt_dim", "in_channels"):
            v = arch[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ReaudioError(f"unet-ldm: {key} must be a positive integer, got {v!r}")
        v = arch["freq_channels"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ReaudioError(f"unet-ldm: freq_channels must be an integer >= 0, got {v!r}")
        v = arch["guidance_embedding"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v % 2:
            raise ReaudioError(f"unet-ldm: guidance_embedding must be an even integer >= 0 (0 = no guidance input), "
                               f"got {v!r}")
        bad = [c for c in chans[1:] if c % arch["head_width"]]
        if bad:
            raise ReaudioError(f"unet-ldm: attention widths {bad} are not multiples of head_width={arch['head_width']}")
        for d in streams:
            if isinstance(d, bool) or not isinstance(d, int) or d < 1:
                raise ReaudioError(f"unet-ldm: text_dim / audio_dim must be positive integers or null, got {d!r}")

    def _load(self, source: UnetSource, checkpoint) -> None:
        n_streams = (self.text_dim is not None) + (self.audio_dim is not None)
        R, levels = self.arch["layers_per_block"], len(self.arch["block_out_channels"])
        hint = ("Set denoiser.params (size / block_out_channels, layers_per_block, prompt_dim, text_dim, audio_dim) "
                "to the checkpoint's.")
        state = source.state
        if source.original:
            state, used_ema = convert_audioldm_unet_state_dict(state, self._baseline_keys(n_streams), R, levels)
            log.info("unet-ldm: loaded AudioLDM %s weights from %s", "EMA" if used_ema else "non-EMA", checkpoint)
        stride = _attention_stride(state, R)
        if n_streams and stride == 1:
            given = set(state)
            state = inflate_audioldm_state_dict(state, self.model, n_streams)
            new = len(set(state) - given)
            log.info("unet-ldm: retrieval UNet initialised from the AudioLDM UNet in %s: every AudioLDM weight loaded; "
                     "%d new stream transformers (%d tensors, %d per attention layer, zero output projection: the "
                     "model computes AudioLDM's output until trained; retrieval_parameters() lists them)", checkpoint,
                     len(self.retrieval_modules()), new, n_streams)
        state = self._inflate_freq_channels(state, checkpoint)
        cond_proj = self.model.time_embedding.cond_proj
        if cond_proj is not None and "time_embedding.cond_proj.weight" not in state:
            log.info("unet-ldm: %s has no guidance input; its projection starts at zero (the checkpoint's "
                     "conditional output until trained)", checkpoint)
            state = {**state, "time_embedding.cond_proj.weight": torch.zeros_like(cond_proj.weight)}
        load_strict(self.model, state, f"unet weights {checkpoint}", hint=hint)

    def _inflate_freq_channels(self, state: dict, checkpoint) -> dict:
        """Weights of a UNet without frequency maps, for one with them: ``conv_in`` gets zero weights for the
        new input channels, so the model computes exactly what the checkpoint does until trained."""
        w = state.get("conv_in.weight")
        want = self.in_channels + self.freq_channels
        if w is None or w.shape[1] != self.in_channels or not self.freq_channels:
            return state
        zeros = torch.zeros(w.shape[0], want - w.shape[1], *w.shape[2:], dtype=w.dtype)
        log.info("unet-ldm: %s has no frequency maps; conv_in extended by %d zero-initialised input channels",
                 checkpoint, self.freq_channels)
        return {**state, "conv_in.weight": torch.cat([w, zeros], 1)}

    def _baseline_keys(self, n_streams: int) -> list[str]:
        """Keys of AudioLDM's (no-retrieval) UNet with this model's sizes."""
        keys = self.model.state_dict().keys()
        if not n_streams:
            return list(keys)
        n, out = 1 + n_streams, []
        for key in keys:
            m = re.fullmatch(r"((?:(?:down|up)_blocks\.\d+|mid_block)\.attentions)\.(\d+)\.(.+)", key)
            if m is None:
                out.append(key)
            elif int(m[2]) % n == 0:
                out.append(f"{m[1]}.{int(m[2]) // n}.{m[3]}")
        return out

    # -- the retrieval layers -----------------------------------------------------------------------------------
    def retrieval_modules(self) -> list[torch.nn.Module]:
        """The retrieval-stream cross-attention transformers: at every attention level (down, middle, up), the
        transformers after each self-attention one (AudioLDM's layer), in the order the model runs them. Empty
        without a stream. These are the layers that :func:`inflate_audioldm_state_dict` adds to AudioLDM's UNet."""
        n = 1 + (self.text_dim is not None) + (self.audio_dim is not None)
        if n == 1:
            return []
        blocks = [*self.model.down_blocks, self.model.mid_block, *self.model.up_blocks]
        return [a for b in blocks for i, a in enumerate(getattr(b, "attentions", None) or []) if i % n]

    def retrieval_parameters(self) -> list[torch.nn.Parameter]:
        """Every parameter of :meth:`retrieval_modules` (what ``training.trainable: retrieval`` trains); every
        other parameter is AudioLDM's. Empty without a retrieval stream."""
        return [p for m in self.retrieval_modules() for p in m.parameters()]

    # -- the Denoiser contract --------------------------------------------------------------------------------
    def _stream(self, what: str, states, mask, dim: int, B: int):
        if states is None:
            raise ReaudioError(f"unet-ldm: this denoiser has a {what} stream ({dim}-d) but the Conditioning's "
                               f"{'captions' if what == 'caption' else 'audio'} is None")
        if not torch.is_tensor(states) or states.ndim != 3 or states.shape[0] != B or states.shape[2] != dim \
                or states.shape[1] == 0:
            raise ReaudioError(f"unet-ldm: {what} states must be [B={B}, L>0, {dim}], got "
                               f"{tuple(states.shape) if torch.is_tensor(states) else type(states).__name__}")
        if mask is not None and (not torch.is_tensor(mask) or tuple(mask.shape) != tuple(states.shape[:2])):
            raise ReaudioError(f"unet-ldm: {what} mask must be [B, L] = {tuple(states.shape[:2])}, got "
                               f"{tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__}")
        states = states.to(self.device, torch.float32)
        return states, (None if mask is None else mask.to(self.device, torch.bool))

    def __call__(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """``latents [B, C, T, F]``, ``timesteps [B]`` (or a scalar), ``cond`` -> epsilon ``[B, C, T, F]``."""
        if not torch.is_tensor(latents) or latents.ndim != 4 or latents.shape[1] != self.in_channels:
            raise ReaudioError(f"unet-ldm: latents must be [B, {self.in_channels}, T, F], got "
                               f"{tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__}")
        B, _, T, F = latents.shape
        if T == 0 or F == 0 or T % self.downsample or F % self.downsample:
            raise ReaudioError(f"unet-ldm: latent size {T} x {F} must be positive multiples of the UNet's "
                               f"downsampling x{self.downsample}")
        timesteps = torch.as_tensor(timesteps)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(B)
        if timesteps.shape != (B,):
            raise ReaudioError(f"unet-ldm: timesteps must be [B={B}], got {tuple(timesteps.shape)}")
        prompt = cond.prompt
        if not torch.is_tensor(prompt) or prompt.shape != (B, self.prompt_dim):
            raise ReaudioError(f"unet-ldm: prompt embedding must be [B={B}, {self.prompt_dim}], got "
                               f"{tuple(prompt.shape) if torch.is_tensor(prompt) else type(prompt).__name__}")
        kwargs = {"class_labels": prompt.to(self.device, torch.float32), "encoder_hidden_states": None}
        streams = []
        if self.text_dim is not None:
            streams.append(self._stream("caption", cond.captions, cond.caption_mask, self.text_dim, B))
        if self.audio_dim is not None:
            streams.append(self._stream("audio", cond.audio, cond.audio_mask, self.audio_dim, B))
        for i, (states, mask) in enumerate(streams):
            suffix = "" if i == 0 else "_1"
            kwargs[f"encoder_hidden_states{suffix}"] = states
            kwargs[f"encoder_attention_mask{suffix}"] = mask
        if self.guidance_input:
            w = cond.guidance
            if not torch.is_tensor(w) or w.shape != (B,):
                raise ReaudioError(f"unet-ldm: this denoiser is guidance-distilled: Conditioning.guidance must be the "
                                   f"[B={B}] guidance scales, got "
                                   f"{tuple(w.shape) if torch.is_tensor(w) else type(w).__name__}")
            kwargs["timestep_cond"] = guidance_features(w.to(self.device), self.arch["guidance_embedding"])
        x = latents.to(self.device, torch.float32)
        if self.freq_channels:
            maps = frequency_maps(self.freq_channels, T, F, device=self.device)
            x = torch.cat([x, maps.expand(B, -1, -1, -1)], 1)
        out = self.model(x, timesteps.to(self.device), **kwargs).sample
        return out.to(latents.device, torch.float32)

    # -- persistence ---------------------------------------------------------------------------------------
    @property
    def params(self) -> dict:
        """Constructor keywords that rebuild this component (weights apart)."""
        return {"size": self.size, **{k: self.arch[k] for k in ("block_out_channels", "layers_per_block",
                                                                "head_width", "prompt_dim", "in_channels",
                                                                "freq_channels", "guidance_embedding")},
                "num_heads": self.num_heads,
                "text_dim": self.text_dim, "audio_dim": self.audio_dim, "checkpoint": None, "device": "cpu"}

    # save_pretrained (Pretrained): config.json (constructor keywords) + model.safetensors (the diffusers UNet's)
    def _config(self) -> dict:
        return self.params

    def _state_dict(self) -> dict:
        return self.model.state_dict()

    @classmethod
    def _pretrained_params(cls, directory: Path, overrides: dict) -> dict:
        """A :meth:`save_pretrained` directory as saved. A diffusers folder or an AudioLDM ``.ckpt`` is loaded
        as what it holds (sizes from it, its retrieval streams or none). ``overrides`` replace constructor
        keywords, e.g. ``text_dim=1024, audio_dim=768`` to initialise a retrieval UNet from an AudioLDM
        checkpoint (the stream not named is then absent), or ``device``."""
        cfg_file = directory / CONFIG_FILE
        if directory.is_dir() and cfg_file.exists() and "_class_name" not in read_json(cfg_file):
            from reaudio_core.registry import get_registry  # keys a directory saved before they existed: registry's
            params = {**get_registry().resolve_params("denoiser", "unet-ldm", {}),
                      **super()._pretrained_params(directory, overrides)}
        else:  # a foreign source (diffusers folder, AudioLDM .ckpt) is loaded as what it is
            from reaudio_core.registry import get_registry
            params = {**get_registry().resolve_params("denoiser", "unet-ldm", {}), "text_dim": None, "audio_dim": None}
            if "text_dim" not in overrides and "audio_dim" not in overrides:
                folder = _diffusers_folder(directory) if directory.is_dir() else None
                streams = _arch_from_diffusers_config(read_json(folder / CONFIG_FILE), folder)[1] if folder else []
                if len(streams) == 1:
                    raise ReaudioError(f"{directory} has one retrieval stream ({streams[0]}-d): say whether it is the "
                                       "caption or the audio stream with text_dim= or audio_dim=")
                if streams:
                    params["text_dim"], params["audio_dim"] = streams
            params.update(overrides)
            params["checkpoint"] = str(directory)
        unknown = set(params) - set(PARAMS)
        if unknown:
            raise ReaudioError(f"unet-ldm: unknown parameter(s) {sorted(unknown)}; known: {', '.join(PARAMS)}")
        return params

    def to(self, device) -> "UNetLDM":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self


@hookimpl
def register_components(register):
    # 32 x [1, 2, 3, 5] channels, 1 res block, 16-wide heads (x8 downsampling), both retrieval streams
    register("denoiser", "unet-ldm", UNetLDM, tiny={"size": "tiny", "prompt_dim": 16, "text_dim": 24, "audio_dim": 20})
