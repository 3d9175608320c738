"""AudioLDM UNet weight sources for the ``unet-ldm`` denoiser (:mod:`reaudio_plugins.unet_ldm`).

Reads every source listed under "Weights" in :mod:`reaudio_plugins.unet_ldm`'s docstring without
building a model (:func:`read_unet_checkpoint`): a ``save_pretrained`` directory, a diffusers folder
(checked to be AudioLDM's layout, :func:`_arch_from_diffusers_config`), or an original AudioLDM
Lightning ``.ckpt``, whose openaimodel naming and flattened EMA copy are converted to diffusers' naming
(:func:`audioldm_key`, :func:`ema_key`, :func:`convert_audioldm_unet_state_dict`) and whose sizes are
read off the weights (:func:`infer_audioldm_arch`). :func:`inflate_audioldm_state_dict` turns AudioLDM
weights into a retrieval UNet's (the stream transformers zero-initialised at their output). Loading
never executes code (safetensors, or ``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from reaudio_core import ReaudioError

from ._ckpt import lightning_state_dict, read_json, read_weights

log = logging.getLogger("reaudio")

NORM_GROUPS = 32  # the original code's GroupNorm32 everywhere
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
BASELINE_CLASS = "UNet2DConditionModel"
RETRIEVAL_CLASS = "AudioLDM2UNet2DConditionModel"
LDM_UNET = "model.diffusion_model."
LDM_EMA = "model_ema."


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
    if cfg.get("time_cond_proj_dim"):  # a guidance-distilled UNet (unet_ldm.guidance_features)
        arch["guidance_embedding"] = int(cfg["time_cond_proj_dim"])
    return arch, streams, heads


class UnetSource:
    """What a weight source holds: ``state`` (diffusers naming, or the raw AudioLDM checkpoint when
    ``original``), ``arch`` (sizes it fixes, may be partial), ``streams`` (its stream widths; ``None`` =
    unknown), ``heads`` (per level, diffusers folders only)."""

    def __init__(self, state, arch=None, streams=None, heads=None, original=False, head_width=None, num_heads=None):
        self.state, self.arch, self.streams, self.heads = state, dict(arch or {}), streams, heads
        self.original, self.head_width, self.num_heads = original, head_width, num_heads


def read_unet_checkpoint(path: str | Path) -> UnetSource:
    """Read any supported UNet weight source (listed in :mod:`reaudio_plugins.unet_ldm`'s docstring) without
    building a model."""
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
                                        "freq_channels", "guidance_embedding") if cfg.get(k) is not None}
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
