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
(safetensors, or ``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from reaudio_core import Conditioning, Denoiser, Pretrained, ReaudioError, hookimpl

from ._ckpt import lightning_state_dict, load_strict, read_json, read_weights

log = logging.getLogger("reaudio")

CHANNEL_MULT = (1, 2, 3, 5)
NORM_GROUPS = 32  # the original code's GroupNorm32 everywhere
#: size -> (model_channels, layers_per_block, head_width)
SIZES = {"tiny": (32, 1, 16), "s": (128, 2, 32), "m": (192, 2, 32), "l": (256, 2, 64)}
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
BASELINE_CLASS = "UNet2DConditionModel"
RETRIEVAL_CLASS = "AudioLDM2UNet2DConditionModel"
LDM_UNET = "model.diffusion_model."
LDM_EMA = "model_ema."
PARAMS = ("size", "block_out_channels", "layers_per_block", "head_width", "num_heads", "prompt_dim", "text_dim",
          "audio_dim", "in_channels", "freq_channels", "checkpoint", "device")


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
                          freq_channels=0, stream_dims=(), num_heads=None) -> tuple[str, dict]:
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
        class_embeddings_concat=True)
    if not stream_dims:
        return BASELINE_CLASS, {**common, "cross_attention_dim": chans}
    return RETRIEVAL_CLASS, {**common, "cross_attention_dim": [[None, *map(int, stream_dims)] for _ in chans]}


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


# -- original AudioLDM (openaimodel) naming <-> diffusers ---------------------------------------------
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "class_embedding": "film_emb", "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet_rest(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET[head]}.{tail}" if head in _RESNET else rest


def audioldm_key(key: str, layers_per_block: int, levels: int) -> str:
    """The original AudioLDM (openaimodel ``UNetModel``) name of a key of AudioLDM's diffusers
    ``UNet2DConditionModel`` (attention at every level but the first). Raises ``KeyError`` for a key
    with no original counterpart.

    ``input_blocks``: 0 = conv_in, then per level ``layers_per_block`` x (ResBlock ``.0`` [+
    SpatialTransformer ``.1``]) and, but for the last level, a Downsample ``.0.op``; ``middle_block``:
    ResBlock, SpatialTransformer, ResBlock; ``output_blocks``: per level from the deepest,
    ``layers_per_block + 1`` x (ResBlock ``.0`` [+ SpatialTransformer ``.1``]), the last with an
    Upsample ``.conv`` after them.
    """
    R = layers_per_block
    module, _, param = key.rpartition(".")
    if module in _TOP:
        return f"{_TOP[module]}.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        n = 1 + int(m[1]) * (R + 1) + int(m[3])
        return f"input_blocks.{n}.0.{_resnet_rest(m[4])}" if m[2] == "resnets" else f"input_blocks.{n}.1.{m[4]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * (R + 1) + R}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet_rest(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        n = int(m[1]) * (R + 1) + int(m[3])
        return f"output_blocks.{n}.0.{_resnet_rest(m[4])}" if m[2] == "resnets" else f"output_blocks.{n}.1.{m[4]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        u = int(m[1])
        has_attention = u < levels - 1  # every up level but the shallowest has attention
        return f"output_blocks.{u * (R + 1) + R}.{2 if has_attention else 1}.conv.{m[2]}"
    raise KeyError(key)


def ema_key(original_key: str) -> str:
    """Lightning ``LitEma`` name of a ``model.diffusion_model.*`` weight: dots removed."""
    return LDM_EMA + ("diffusion_model." + original_key).replace(".", "")


def convert_audioldm_unet_state_dict(sd: dict, target_keys, layers_per_block: int, levels: int,
                                     prefer_ema: bool = True) -> tuple[dict, bool]:
    """An AudioLDM Lightning state dict (``model.diffusion_model.*`` and/or ``model_ema.*``; or a bare UNet
    state dict in openaimodel naming) -> ``(state dict over target_keys, used_ema)``.

    ``target_keys`` are the keys of AudioLDM's diffusers ``UNet2DConditionModel`` (e.g. its ``state_dict()``).
    The EMA copy is used when ``prefer_ema`` and it holds every weight; otherwise the plain weights.
    Unconverted leftovers are returned under ``"<unexpected> NAME"`` and missing weights are absent, so a
    strict load that follows names both.
    """
    if any(k.startswith(LDM_UNET) for k in sd) or any(k.startswith(LDM_EMA + "diffusion_model") for k in sd):
        plain = {k[len(LDM_UNET):]: v for k, v in sd.items() if k.startswith(LDM_UNET)}
    else:  # a bare UNet state dict
        plain = {k: v for k, v in sd.items() if k != "scale_factor"}
    names = {}
    for key in target_keys:
        try:
            names[key] = audioldm_key(key, layers_per_block, levels)
        except KeyError:
            pass  # reported as missing by the strict load
    ema_present = [k for k in sd if k.startswith(LDM_EMA + "diffusion_model")]
    use_ema = False
    if prefer_ema and ema_present:
        complete = sum(ema_key(o) in sd for o in names.values())
        use_ema = complete == len(names)
        if not use_ema:
            log.warning("unet-ldm: the checkpoint's EMA copy holds %d of %d UNet weights; using the non-EMA weights",
                        complete, len(names))
    out, used = {}, set()
    for key, orig in names.items():
        src = ema_key(orig) if use_ema else orig
        table = sd if use_ema else plain
        if src in table:
            out[key] = table[src]
            used.add(src)
    leftovers = (set(ema_present) - {"model_ema.diffusion_model"}) if use_ema else set(plain)
    for k in sorted(leftovers - used):
        out[f"<unexpected> {k}"] = (sd if use_ema else plain)[k]
    return out, use_ema


def infer_audioldm_arch(sd: dict) -> dict | None:
    """Sizes of an AudioLDM UNet from its openaimodel-named weights (``model.diffusion_model.*`` or bare):
    ``block_out_channels``, ``layers_per_block``, ``prompt_dim``, ``in_channels``. ``None`` when the plain
    weights are absent (an EMA-only checkpoint: the configured sizes are used)."""
    u = {k[len(LDM_UNET):]: v for k, v in sd.items() if k.startswith(LDM_UNET)} or sd
    if "time_embed.0.weight" not in u or "input_blocks.0.0.weight" not in u:
        return None
    ch = int(u["time_embed.0.weight"].shape[1])
    if "film_emb.weight" not in u:
        raise ReaudioError("this AudioLDM UNet has no 'film_emb' (prompt embedding) layer; unet-ldm needs AudioLDM's "
                           "text-conditioned UNet (extra_film_condition_dim)")
    prompt_dim = int(u["film_emb.weight"].shape[1])
    emb_width = {int(v.shape[1]) for k, v in u.items() if k.endswith("emb_layers.1.weight")}
    if emb_width != {8 * ch}:
        raise ReaudioError(f"this AudioLDM UNet adds its prompt embedding to the time embedding (ResBlock embedding "
                           f"widths {sorted(emb_width)}, expected {8 * ch}); unet-ldm implements the concatenation "
                           "(extra_film_use_concat: true) only")
    downs = sorted(int(m[1]) for k in u if (m := re.fullmatch(r"input_blocks\.(\d+)\.0\.op\.weight", k)))
    levels = len(downs) + 1
    layers = downs[0] - 1 if downs else max(int(m[1]) for k in u if (m := re.match(r"input_blocks\.(\d+)\.", k)))
    chans = []
    for level in range(levels):
        w = u.get(f"input_blocks.{1 + level * (layers + 1)}.0.in_layers.2.weight")
        if w is None:
            raise ReaudioError(f"cannot read the UNet layout from this checkpoint (no input_blocks."
                               f"{1 + level * (layers + 1)} ResBlock)")
        chans.append(int(w.shape[0]))
    return {"block_out_channels": chans, "layers_per_block": layers, "prompt_dim": prompt_dim,
            "in_channels": int(u["input_blocks.0.0.weight"].shape[1])}


def _attention_stride(keys, layers_per_block: int) -> int:
    """Transformers per res block in a state dict: 1 for AudioLDM's UNet, 1 + streams for a retrieval one."""
    idx = [int(m[1]) for k in keys if (m := re.match(r"down_blocks\.\d+\.attentions\.(\d+)\.", k))]
    return (max(idx) + 1) // layers_per_block if idx else 1


def inflate_audioldm_state_dict(sd: dict, model: torch.nn.Module, n_streams: int) -> dict:
    """AudioLDM's diffusers UNet weights -> a full state dict for ``model`` (an AudioLDM2-style retrieval UNet
    with ``n_streams`` cross-attention transformers after each self-attention transformer).

    Each AudioLDM transformer ``attentions.j`` becomes ``attentions.{j * (1 + n_streams)}`` (the pure
    self-attention layer); the stream transformers keep ``model``'s initialisation with their output
    projection (``proj_out``) zeroed, which makes each an exact identity (their residual). Keys of ``sd``
    with no place in ``model`` are kept, so a strict load reports them."""
    n = 1 + n_streams
    out = {}
    for key, value in sd.items():
        m = re.fullmatch(r"((?:down|up)_blocks\.\d+\.attentions)\.(\d+)\.(.+)", key)
        out[f"{m[1]}.{int(m[2]) * n}.{m[3]}" if m else key] = value
    own = model.state_dict()
    for key, value in own.items():
        m = re.match(r"(?:(?:down|up)_blocks\.\d+|mid_block)\.attentions\.(\d+)\.(.+)", key)
        if key in out or m is None or int(m[1]) % n == 0:
            continue  # AudioLDM's own weight, or absent from sd (the strict load reports it missing)
        out[key] = torch.zeros_like(value) if m[2].startswith("proj_out.") else value.clone()
    return out


# -- reading weight sources ----------------------------------------------------------------------------------
def _diffusers_folder(path: Path) -> Path | None:
    if (path / "unet").is_dir() and ((path / "model_index.json").exists() or (path / "unet" / CONFIG_FILE).exists()):
        return path / "unet"
    cfg = path / CONFIG_FILE
    if cfg.exists() and "_class_name" in read_json(cfg):
        return path
    return None


def _arch_from_diffusers_config(cfg: dict, folder: Path) -> tuple[dict, list[int], list[int]]:
    """(sizes, stream dims, heads per level) of a diffusers AudioLDM / AudioLDM2-style UNet config."""
    name = cfg.get("_class_name")
    if name not in (BASELINE_CLASS, RETRIEVAL_CLASS):
        raise ReaudioError(f"{folder}: config.json describes a {name}, not a {BASELINE_CLASS} or {RETRIEVAL_CLASS}")
    chans = [int(c) for c in cfg.get("block_out_channels", [])]
    levels = len(chans)
    problems = []
    if cfg.get("class_embed_type") != "simple_projection" or not cfg.get("class_embeddings_concat"):
        problems.append("the prompt embedding must be a concatenated simple_projection class embedding "
                        f"(class_embed_type={cfg.get('class_embed_type')!r}, "
                        f"class_embeddings_concat={cfg.get('class_embeddings_concat')!r})")
    if list(cfg.get("down_block_types", [])) != ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (levels - 1) or \
            list(cfg.get("up_block_types", [])) != ["CrossAttnUpBlock2D"] * (levels - 1) + ["UpBlock2D"]:
        problems.append(f"block types {cfg.get('down_block_types')} / {cfg.get('up_block_types')} are not "
                        "AudioLDM's (attention at every level but the first)")
    if cfg.get("use_linear_projection") or cfg.get("transformer_layers_per_block", 1) not in (1, [1] * levels):
        problems.append("linear projections / several transformer layers per block are not AudioLDM's")
    if not isinstance(cfg.get("layers_per_block"), int):
        problems.append(f"layers_per_block={cfg.get('layers_per_block')!r} is not one integer")
    if cfg.get("in_channels") != cfg.get("out_channels"):
        problems.append(f"in_channels {cfg.get('in_channels')} != out_channels {cfg.get('out_channels')}")
    if cfg.get("norm_num_groups", 32) != NORM_GROUPS:
        problems.append(f"norm_num_groups={cfg.get('norm_num_groups')} (AudioLDM's is {NORM_GROUPS})")
    cross = cfg.get("cross_attention_dim")
    streams: list[int] = []
    if name == BASELINE_CLASS:
        if list(cross or []) != chans:
            problems.append(f"cross_attention_dim={cross!r}: AudioLDM's UNet attends to itself "
                            f"(cross_attention_dim = block_out_channels {chans})")
    else:
        rows = [list(r) if isinstance(r, (list, tuple)) else [r] for r in (cross or [])]
        if len(rows) != levels or any(r != rows[0] for r in rows) or not rows[0] or rows[0][0] is not None \
                or any(d is None for d in rows[0][1:]) or len(rows[0]) > 3:
            problems.append(f"cross_attention_dim={cross!r} is not [[None, d_text?, d_audio?]] * levels")
        else:
            streams = [int(d) for d in rows[0][1:]]
    if problems:
        raise ReaudioError(f"{folder}: not an AudioLDM / Re-AudioLDM UNet: " + "; ".join(problems))
    heads = cfg.get("attention_head_dim", 8)
    heads = [int(heads)] * levels if isinstance(heads, int) else [int(h) for h in heads]
    arch = {"block_out_channels": chans, "layers_per_block": int(cfg["layers_per_block"]),
            "prompt_dim": int(cfg["projection_class_embeddings_input_dim"]), "in_channels": int(cfg["in_channels"])}
    return arch, streams, heads


class UnetSource:
    """What a weight source holds: ``state`` (diffusers naming, or the raw AudioLDM checkpoint when
    ``original``), ``arch`` (sizes it fixes, may be partial), ``streams`` (its stream widths; ``None`` =
    unknown), ``heads`` (per level, diffusers folders only)."""

    def __init__(self, state, arch=None, streams=None, heads=None, original=False, head_width=None, num_heads=None):
        self.state, self.arch, self.streams, self.heads = state, dict(arch or {}), streams, heads
        self.original, self.head_width, self.num_heads = original, head_width, num_heads


def read_unet_checkpoint(path: str | Path) -> UnetSource:
    """Read any supported UNet weight source (see the module docstring) without building a model."""
    path = Path(path)
    if not path.exists():
        raise ReaudioError(f"unet checkpoint not found: {path}")
    if path.is_dir():
        folder = _diffusers_folder(path)
        if folder is not None:
            cfg = read_json(folder / CONFIG_FILE)
            arch, streams, heads = _arch_from_diffusers_config(cfg, folder)
            weights = next((folder / f for f in DIFFUSERS_WEIGHTS if (folder / f).exists()), None)
            if weights is None:
                raise ReaudioError(f"{folder}: no weights ({' or '.join(DIFFUSERS_WEIGHTS)})")
            return UnetSource(read_weights(weights), arch, streams, heads)
        if (path / CONFIG_FILE).exists() and (path / WEIGHTS_FILE).exists():
            cfg = read_json(path / CONFIG_FILE)
            arch = {k: cfg[k] for k in ("block_out_channels", "layers_per_block", "prompt_dim", "in_channels",
                                        "freq_channels") if cfg.get(k) is not None}
            streams = [int(cfg[k]) for k in ("text_dim", "audio_dim") if cfg.get(k) is not None]
            return UnetSource(read_weights(path / WEIGHTS_FILE), arch, streams, head_width=cfg.get("head_width"),
                              num_heads=cfg.get("num_heads"))
        raise ReaudioError(f"{path}: not a UNet directory (expected {CONFIG_FILE} + {WEIGHTS_FILE} written by "
                           "save_pretrained, or a diffusers folder with model_index.json and unet/)")
    sd = lightning_state_dict(read_weights(path))
    if any(k.startswith((LDM_UNET, LDM_EMA + "diffusion_model")) for k in sd) or "time_embed.0.weight" in sd:
        return UnetSource(sd, infer_audioldm_arch(sd), [], original=True)
    if "conv_in.weight" in sd:
        return UnetSource(sd)
    raise ReaudioError(f"{path}: no UNet weights found (expected AudioLDM 'model.diffusion_model.*' / 'model_ema.*' "
                       "keys, an openaimodel UNet state dict, or diffusers UNet keys)")


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
                 audio_dim, in_channels, freq_channels, checkpoint, device):
        if size not in SIZES:
            raise ReaudioError(f"unet-ldm: unknown size {size!r}; known: {', '.join(SIZES)}")
        base, size_layers, size_width = SIZES[size]
        arch = {"block_out_channels": [base * m for m in CHANNEL_MULT] if block_out_channels is None
                else list(block_out_channels),
                "layers_per_block": size_layers if layers_per_block is None else layers_per_block,
                "prompt_dim": prompt_dim, "in_channels": in_channels, "freq_channels": freq_channels}
        streams = [d for d in (text_dim, audio_dim) if d is not None]
        source = read_unet_checkpoint(checkpoint) if checkpoint else None
        if source is not None:
            if not source.arch.get("freq_channels"):  # weights without frequency maps fit a model with them
                source.arch.pop("freq_channels", None)
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
                "freq_channels": int(arch["freq_channels"])}
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
                                                                "freq_channels")}, "num_heads": self.num_heads,
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
