"""CLAP as a text encoder and an audio encoder (both named ``clap``).

transformers' ``ClapModel`` (HTSAT audio tower + RoBERTa text tower, joint space of
``projection_dim`` = 512 for LAION-CLAP). Audio arrives at 16 kHz and is resampled to the
feature extractor's rate (48 kHz) before ``ClapFeatureExtractor`` (64 log-mel bins, 10 s,
``repeatpad`` padding; ``rand_trunc`` or ``fusion`` truncation for longer clips, with its random
crop drawn from a fixed seed so the encoder is deterministic).

Where the weights come from (``pretrained``):

* a Hugging Face ``ClapModel`` folder (``config.json`` + weights + tokenizer/processor files), or
  its id (e.g. ``laion/clap-htsat-unfused``) looked up in the local cache only;
* a LAION-CLAP ``.pt`` checkpoint (``630k-audioset-best.pt`` layout: ``state_dict`` with
  ``module.`` prefixes, ``audio_branch.*`` HTSAT, ``text_branch.*`` RoBERTa, ``text_projection.*``,
  ``audio_projection.*``, ``logit_scale_a/t``) or an AudioLDM ``.ckpt`` (the same keys under
  ``cond_stage_model.model.``): the architecture is read off the tensor shapes and the keys are
  converted into the ``ClapModel`` layout by :func:`laion_to_hf`. The text tokenizer is not in such a
  file: ``processor=DIR`` names a folder holding it (else the locally cached
  ``laion/clap-htsat-unfused`` or ``roberta-base`` is used, if present);
* a folder written by :meth:`save_pretrained` (``config.json``, ``model.safetensors``,
  ``clap_config.json``, tokenizer and ``preprocessor_config.json``);
* the text tower alone: a ``ClapTextModelWithProjection`` folder (the ``text_encoder/`` of a diffusers
  ``AudioLDMPipeline``), its tokenizer from ``processor=DIR``, else from the folder itself, else from the
  sibling ``tokenizer/`` of a diffusers pipeline root; or the pipeline root itself (``model_index.json``
  beside ``text_encoder/`` and ``tokenizer/``). Such a model has no audio tower: the ``clap`` text encoder
  loads it, the audio encoder refuses it.

``random_init: true`` builds random weights (``size``: ``full`` = the LAION-CLAP HTSAT-tiny +
RoBERTa-base architecture, ``tiny`` = a test-size model; ``config`` overrides any ``ClapConfig``
field; ``seed`` makes them reproducible); without a ``processor`` the MiniLM WordPiece tokenizer
stands in (see :func:`reaudio_plugins._encoders.fallback_tokenizer`).

``backend: laion`` runs the optional ``laion-clap`` package instead (``pip install "reaudio[laion]"``),
imported only then; it gives embeddings, not token states.

Outputs. Text: ``embed`` = the L2-normalised projected RoBERTa pooler output ([B, 512]);
``encode_tokens`` = the last hidden states ([B, L, 768]). Audio: ``embed`` = the L2-normalised
projected HTSAT embedding ([B, 512]); ``encode_tokens`` = the final HTSAT feature map averaged
over frequency: ``num_tokens`` (32 for HTSAT-tiny) time steps of ``hidden_size`` (768), mask all True.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from reaudio_core import AudioEncoder, Pretrained, ReaudioError, TextEncoder, hookimpl
from reaudio_core.optional import require

from . import _encoders as E

DEFAULT_HUB_ID = "laion/clap-htsat-unfused"

SIZES: dict[str, dict] = {
    "full": {},  # ClapConfig defaults: HTSAT-tiny (96, [2,2,6,2]) + RoBERTa-base, 512-d joint space
    "tiny": {
        "projection_dim": 16,
        "text_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "intermediate_size": 64, "max_position_embeddings": 130},
        "audio_config": {"patch_embeds_hidden_size": 8, "depths": [1, 1, 1, 1],
                         "num_attention_heads": [1, 1, 2, 2]},
    },
}

# Buffers that ClapModel computes from its configuration; a checkpoint may lack them.
_DERIVED_BUFFERS = re.compile(r"(embeddings\.position_ids|embeddings\.token_type_ids|relative_position_index)$")


# -- LAION-CLAP -> transformers ClapModel ---------------------------------------------------------------
_HTSAT_BLOCK = {  # LAION HTSAT (Swin) block module -> ClapAudioLayer module
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.relative_position_bias_table": "attention.self.relative_position_bias_table",
    "attn.relative_position_index": "attention.self.relative_position_index",
    "attn.proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_HTSAT_UNUSED = ("spectrogram_extractor.", "logmel_extractor.", "tscam_conv.", "head.")


def laion_to_hf(sd: dict) -> tuple[dict, list[str], list[str]]:
    """Convert a LAION-CLAP state dict (prefix already removed) to ``ClapModel`` keys.

    Returns ``(converted, ignored, unknown)``. ``ignored`` are LAION keys with no ClapModel
    counterpart that the embeddings never use: the torchlibrosa STFT/mel buffers (the feature
    extractor computes the mel), HTSAT's classification head (``tscam_conv``, ``head``), the
    shifted-window ``attn_mask`` buffers (recomputed), and the training-only ``text_transform`` /
    ``audio_transform`` MLPs. ``unknown`` are keys this converter does not understand.
    """
    out, ignored, unknown = {}, [], []
    for key, value in sd.items():
        if key.startswith("audio_branch."):
            rest = key[len("audio_branch."):]
            if rest.startswith(_HTSAT_UNUSED):
                ignored.append(key)
                continue
            block = re.fullmatch(r"(layers\.\d+\.blocks\.\d+)\.(.+)\.(weight|bias)", rest)
            buf = re.fullmatch(r"(layers\.\d+\.blocks\.\d+)\.(attn\.relative_position_\w+|attn_mask)", rest)
            if buf:
                if buf.group(2) == "attn_mask":
                    ignored.append(key)
                    continue
                new = f"{buf.group(1)}.{_HTSAT_BLOCK[buf.group(2)]}"
            elif block and block.group(2) == "attn.qkv":
                prefix, param = block.group(1), block.group(3)
                q, k, v = value.chunk(3, dim=0)
                for name, part in (("query", q), ("key", k), ("value", v)):
                    out[f"audio_model.audio_encoder.{prefix}.attention.self.{name}.{param}"] = part.clone()
                continue
            elif block and block.group(2) in _HTSAT_BLOCK:
                new = f"{block.group(1)}.{_HTSAT_BLOCK[block.group(2)]}.{block.group(3)}"
            elif block:
                unknown.append(key)
                continue
            elif rest.startswith("bn0."):
                new = "batch_norm." + rest[len("bn0."):]
            elif rest.startswith(("patch_embed.", "norm.")) or re.match(r"layers\.\d+\.downsample\.", rest):
                new = rest
            else:
                unknown.append(key)
                continue
            out["audio_model.audio_encoder." + new] = value
        elif key.startswith("text_branch."):
            out["text_model." + key[len("text_branch."):]] = value
        elif m := re.fullmatch(r"(text|audio)_projection\.([02])\.(weight|bias)", key):
            out[f"{m.group(1)}_projection.linear{1 if m.group(2) == '0' else 2}.{m.group(3)}"] = value
        elif key in ("logit_scale_a", "logit_scale_t"):
            out[key] = value
        elif key.startswith(("text_transform.", "audio_transform.")):
            ignored.append(key)
        else:
            unknown.append(key)
    return out, ignored, unknown


def _strip_to_clap(sd: dict, path) -> dict:
    """The CLAP part of ``sd``: keys under the prefix that precedes ``audio_branch.`` (``module.``
    in LAION training checkpoints, ``cond_stage_model.model.`` in AudioLDM checkpoints)."""
    anchor = "audio_branch.patch_embed.proj.weight"
    prefixes = sorted({k[:-len(anchor)] for k in sd if isinstance(k, str) and k.endswith(anchor)}, key=len)
    if not prefixes:
        sample = ", ".join(list(sd)[:4])
        raise ReaudioError(f"{path} is not a LAION-CLAP checkpoint: no '*{anchor}' key (first keys: {sample}). "
                           "Pass a LAION-CLAP .pt (e.g. 630k-audioset-best.pt), an AudioLDM .ckpt, or a Hugging Face "
                           "ClapModel folder.")
    prefix = prefixes[0]
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def infer_laion_config(sd: dict) -> dict:
    """``ClapConfig`` keywords read off the tensor shapes of a LAION-CLAP state dict.

    Not recoverable from shapes and taken from LAION-CLAP's HTSAT/RoBERTa setup: ``spec_size``
    256, patch stride = patch size, text heads = hidden / 64 (RoBERTa), text LayerNorm eps 1e-5
    (roberta-base); override any of them with the ``config`` parameter.
    """
    a, t = "audio_branch.", "text_branch."
    try:
        proj = sd[a + "patch_embed.proj.weight"]
        width, patch = int(proj.shape[0]), int(proj.shape[-1])
        depths, heads = [], []
        while f"{a}layers.{len(depths)}.blocks.0.norm1.weight" in sd:
            i = len(depths)
            n = 0
            while f"{a}layers.{i}.blocks.{n}.norm1.weight" in sd:
                n += 1
            depths.append(n)
            heads.append(int(sd[f"{a}layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1]))
        table = int(sd[f"{a}layers.0.blocks.0.attn.relative_position_bias_table"].shape[0])
        window = (int(round(math.sqrt(table))) + 1) // 2
        fc1 = sd[f"{a}layers.0.blocks.0.mlp.fc1.weight"]
        audio = {
            "patch_embeds_hidden_size": width, "patch_size": patch, "patch_stride": [patch, patch],
            "depths": depths, "num_attention_heads": heads, "window_size": window, "spec_size": 256,
            "num_mel_bins": int(sd[a + "bn0.weight"].shape[0]), "mlp_ratio": fc1.shape[0] / width,
            "qkv_bias": f"{a}layers.0.blocks.0.attn.qkv.bias" in sd,
            "enable_fusion": any(".fusion_model." in k for k in sd),
            "enable_patch_layer_norm": a + "patch_embed.norm.weight" in sd,
        }
        if audio["enable_fusion"]:
            audio["fusion_type"] = "aff_2d"
            if any("mel_conv1d" in k for k in sd):
                raise ReaudioError("LAION-CLAP 1-D feature fusion (mel_conv1d) has no transformers equivalent; "
                                   "use a non-fusion or aff_2d fusion checkpoint, or backend=laion")
        vocab, hidden = (int(x) for x in sd[t + "embeddings.word_embeddings.weight"].shape)
        layers = 0
        while f"{t}encoder.layer.{layers}.attention.self.query.weight" in sd:
            layers += 1
        text = {
            "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": max(1, hidden // 64),
            "intermediate_size": int(sd[f"{t}encoder.layer.0.intermediate.dense.weight"].shape[0]),
            "max_position_embeddings": int(sd[t + "embeddings.position_embeddings.weight"].shape[0]),
            "type_vocab_size": int(sd[t + "embeddings.token_type_embeddings.weight"].shape[0]),
            "layer_norm_eps": 1e-5, "pad_token_id": 1,
        }
        projection_dim = int(sd["audio_projection.0.weight"].shape[0])
    except KeyError as exc:
        raise ReaudioError(f"LAION-CLAP checkpoint lacks {exc.args[0]!r}: incomplete or not a CLAP "
                           "(HTSAT + RoBERTa) checkpoint") from None
    return {"projection_dim": projection_dim, "text_config": text, "audio_config": audio}


def build_config(base: dict, overrides=None, **text_extra):
    from transformers import ClapConfig
    d = E.merge_config(base, overrides)
    text = {**(d.pop("text_config", None) or {}), **text_extra}
    audio = dict(d.pop("audio_config", None) or {})
    depths = audio.get("depths", [2, 2, 6, 2])
    audio["hidden_size"] = int(audio.get("patch_embeds_hidden_size", 96)) * 2 ** (len(depths) - 1)
    audio.setdefault("num_hidden_layers", len(depths))
    return ClapConfig(text_config=text, audio_config=audio, **d)


# -- loading ---------------------------------------------------------------------------------------
class _Bundle:
    """A loaded CLAP: model, tokenizer, feature extractor, and what loading did. A text tower alone
    (``ClapTextModelWithProjection``) has ``text_only`` set, no feature extractor and no audio sizes."""

    backend = "transformers"

    def __init__(self, model, tokenizer, feature_extractor, origin: str, report: dict):
        self.model, self.tokenizer, self.fe = model, tokenizer, feature_extractor
        self.origin, self.report = origin, report
        self.config = model.config
        self.text_only = not hasattr(self.config, "audio_config")
        self.projection_dim = int(self.config.projection_dim)
        self.text_width = int((self.config if self.text_only else self.config.text_config).hidden_size)
        if self.text_only:
            self.audio_width = self.num_tokens = 0
            return
        audio = self.config.audio_config
        self.audio_width = int(audio.hidden_size)
        self.fe.truncation = "fusion" if audio.enable_fusion else "rand_trunc"
        layers = len(audio.depths)
        freq_ratio = audio.spec_size // audio.num_mel_bins
        self.num_tokens = freq_ratio * (audio.spec_size // 2 ** (layers - 1) // _pair(audio.patch_stride)[1])


def _pair(x):
    return tuple(x) if isinstance(x, (list, tuple)) else (x, x)


def _feature_extractor(folder: Path | None):
    from transformers import ClapFeatureExtractor
    if folder is not None and any((folder / f).is_file() for f in ("preprocessor_config.json",
                                                                    "processor_config.json")):
        try:
            return ClapFeatureExtractor.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:
            raise ReaudioError(f"clap: cannot read the feature extractor settings in {folder}: {exc}") from None
    return ClapFeatureExtractor()  # LAION-CLAP's: 48 kHz, 64 mel bins, hop 480, 10 s, repeatpad


def _tokenizer_from(folder: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json"))


def _processor_for_checkpoint(processor, fusion: bool, path) -> tuple:
    """(tokenizer, feature extractor) for a weights file that carries neither."""
    if processor:
        folder = E.resolve_local(processor, what="clap processor (tokenizer)", param="processor")
        return _tokenizer_from(folder), _feature_extractor(folder)
    for repo in (("laion/clap-htsat-fused" if fusion else DEFAULT_HUB_ID), "roberta-base"):
        snap = E.hub_snapshot(repo)
        if snap is not None and _has_tokenizer(snap):
            return _tokenizer_from(snap), _feature_extractor(snap if repo.startswith("laion/") else None)
    raise ReaudioError(
        f"clap: {path} holds weights but no text tokenizer, and none is on this machine. Pass processor=DIR, a "
        f"folder with the RoBERTa tokenizer files (on a machine with network: `huggingface-cli download "
        f"{DEFAULT_HUB_ID} --local-dir DIR`, then copy DIR here).")


def _load_checkpoint_file(path: Path, processor, config) -> _Bundle:
    from transformers import ClapModel

    from ._ckpt import lightning_state_dict, load_strict
    sd = _strip_to_clap(lightning_state_dict(E.read_checkpoint(path)), path)
    cfg = build_config(infer_laion_config(sd), config)
    converted, ignored, unknown = laion_to_hf(sd)
    if unknown:
        raise ReaudioError(f"clap: {len(unknown)} key(s) of {path} are not part of a LAION-CLAP model: "
                           f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    with E.seeded(0):
        model = ClapModel(cfg)
    own = model.state_dict()
    filled = sorted(k for k in own if k not in converted and _DERIVED_BUFFERS.search(k))
    for k in filled:
        converted[k] = own[k]
    load_strict(model, converted, f"LAION-CLAP checkpoint {path}",
                hint="If the architecture was misread, pass config={text_config: {...}, audio_config: {...}}.")
    tokenizer, fe = _processor_for_checkpoint(processor, cfg.audio_config.enable_fusion, path)
    return _Bundle(model, tokenizer, fe, f"LAION-CLAP {path}", {"ignored": ignored, "filled": filled})


def _load_saved(folder: Path) -> _Bundle:
    """A folder written by :meth:`_ClapBase.save_pretrained` (a full CLAP, or a text tower alone)."""
    from transformers import ClapModel, ClapTextConfig, ClapTextModelWithProjection

    from ._ckpt import load_strict, read_json, read_weights
    saved = read_json(folder / "clap_config.json")
    text_only = saved.get("model_type") == TEXT_MODEL_TYPE
    with E.seeded(0):
        model = (ClapTextModelWithProjection(ClapTextConfig.from_dict(saved)) if text_only
                 else ClapModel(build_config(saved)))
    load_strict(model, read_weights(folder / E.WEIGHTS_FILE), f"{folder / E.WEIGHTS_FILE}")
    return _Bundle(model, _tokenizer_from(folder), None if text_only else _feature_extractor(folder), f"saved {folder}",
                   {"ignored": [], "filled": []})


TEXT_MODEL_TYPE = "clap_text_model"
TEXT_MODEL_CLASS = "ClapTextModelWithProjection"


def _is_text_tower(folder: Path) -> bool:
    """``folder/config.json`` describes a ``ClapTextModelWithProjection`` (CLAP's text tower alone)."""
    from ._ckpt import read_json
    cfg = read_json(folder / "config.json")
    return cfg.get("model_type") == TEXT_MODEL_TYPE or TEXT_MODEL_CLASS in (cfg.get("architectures") or [])


def _load_text_tower(folder: Path, processor) -> _Bundle:
    """A ``ClapTextModelWithProjection`` folder (e.g. a diffusers AudioLDM pipeline's ``text_encoder/``) and
    its tokenizer: ``processor``, else the folder's own files, else the pipeline root's ``tokenizer/``."""
    from transformers import ClapTextModelWithProjection
    try:
        model, info = ClapTextModelWithProjection.from_pretrained(str(folder), local_files_only=True,
                                                                  output_loading_info=True, dtype=torch.float32)
    except Exception as exc:
        raise ReaudioError(f"clap: cannot load a {TEXT_MODEL_CLASS} from {folder}: {type(exc).__name__}: {exc}") \
            from None
    _check_loading(info, folder, TEXT_MODEL_CLASS)
    sibling = folder.parent / "tokenizer"
    if processor:
        tok_folder = E.resolve_local(processor, what="clap processor (tokenizer)", param="processor")
    elif _has_tokenizer(folder):
        tok_folder = folder
    elif (folder.parent / "model_index.json").is_file() and _has_tokenizer(sibling):
        tok_folder = sibling
    else:
        raise ReaudioError(f"clap: {folder} holds a {TEXT_MODEL_CLASS} but no tokenizer files, and it is not the "
                           "text_encoder/ of a diffusers pipeline with a tokenizer/ beside it; pass processor=DIR "
                           "(a folder with the tokenizer files)")
    return _Bundle(model, _tokenizer_from(tok_folder), None, f"{TEXT_MODEL_CLASS} {folder} (tokenizer {tok_folder})",
                   {"ignored": [], "filled": sorted(info.get("missing_keys", []))})


def _check_loading(info: dict, folder: Path, what: str) -> None:
    """Refuse a ``from_pretrained`` that left weights missing (other than derived buffers), unused or mis-shaped."""
    missing = [k for k in info.get("missing_keys", []) if not _DERIVED_BUFFERS.search(k)]
    bad = missing + list(info.get("unexpected_keys", [])) + [str(m) for m in info.get("mismatched_keys", [])]
    if bad:
        raise ReaudioError(f"clap: {folder} does not fit {what}: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")


def _load_hf_folder(folder: Path, processor) -> _Bundle:
    from transformers import ClapModel
    try:
        model, info = ClapModel.from_pretrained(str(folder), local_files_only=True, output_loading_info=True,
                                                dtype=torch.float32)
    except Exception as exc:
        raise ReaudioError(f"clap: cannot load a ClapModel from {folder}: {type(exc).__name__}: {exc}") from None
    _check_loading(info, folder, "ClapModel")
    if processor:
        tok_folder = E.resolve_local(processor, what="clap processor (tokenizer)", param="processor")
    elif _has_tokenizer(folder):
        tok_folder = folder
    else:
        raise ReaudioError(f"clap: {folder} has no tokenizer files; pass processor=DIR (a folder with them)")
    return _Bundle(model, _tokenizer_from(tok_folder), _feature_extractor(tok_folder if processor else folder),
                   f"ClapModel {folder}", {"ignored": [], "filled": sorted(info.get("missing_keys", []))})


def _load_random(size: str, config, processor, seed: int) -> _Bundle:
    from transformers import ClapModel
    if size not in SIZES:
        raise ReaudioError(f"clap: unknown size {size!r}. Known: {', '.join(SIZES)}")
    if processor:
        folder = E.resolve_local(processor, what="clap processor (tokenizer)", param="processor")
        tokenizer, fe = _tokenizer_from(folder), _feature_extractor(folder)
    else:
        tokenizer, fe = E.fallback_tokenizer(), _feature_extractor(None)
    text_extra = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    cfg = build_config(E.merge_config(SIZES[size], config), None, **text_extra)
    with E.seeded(seed):
        model = ClapModel(cfg)
    return _Bundle(model, tokenizer, fe, f"random init (size {size}, seed {seed})", {"ignored": [], "filled": []})


def _load(pretrained, processor, random_init, size, config, seed) -> _Bundle:
    E.random_init_check("clap", random_init, pretrained)
    if random_init:
        return _load_random(size, config, processor, seed)
    if not pretrained:
        raise ReaudioError("clap: no weights given. Pass pretrained=DIR (a Hugging Face ClapModel folder, e.g. "
                           f"{DEFAULT_HUB_ID}) or FILE (a LAION-CLAP .pt such as 630k-audioset-best.pt), or "
                           "random_init=true for random weights")
    path = E.resolve_local(pretrained, what="clap", param="pretrained")
    if path.is_file():
        return _load_checkpoint_file(path, processor, config)
    if (path / "clap_config.json").is_file() and (path / E.WEIGHTS_FILE).is_file():
        return _load_saved(path)
    if (path / "model_index.json").is_file() and (path / "text_encoder" / "config.json").is_file():
        path = path / "text_encoder"  # a diffusers pipeline root: its text tower (and tokenizer/ beside it)
    if (path / "config.json").is_file():
        return _load_text_tower(path, processor) if _is_text_tower(path) else _load_hf_folder(path, processor)
    raise ReaudioError(f"clap: {path} holds neither a ClapModel (config.json) nor a saved reaudio CLAP "
                       "(clap_config.json + model.safetensors)")


class _LaionBundle:
    """``backend: laion``: the optional laion-clap package (embeddings only)."""

    backend = "laion"

    def __init__(self, pretrained, config):
        laion_clap = require("laion_clap", "laion", "clap backend 'laion'", "laion-clap",
                             alternative="use backend=transformers (the same checkpoint, converted)")
        from ._ckpt import lightning_state_dict
        if not pretrained:
            raise ReaudioError("clap backend 'laion' needs pretrained=FILE (a LAION-CLAP .pt checkpoint)")
        path = E.resolve_local(pretrained, what="clap", param="pretrained")
        sd = _strip_to_clap(lightning_state_dict(E.read_checkpoint(path)), path)
        inferred = infer_laion_config(sd)
        audio, self.dim = inferred["audio_config"], inferred["projection_dim"]
        amodel = {96: "HTSAT-tiny", 128: "HTSAT-base", 256: "HTSAT-large"}.get(audio["patch_embeds_hidden_size"])
        if amodel is None:
            raise ReaudioError(f"clap backend 'laion': unknown HTSAT width {audio['patch_embeds_hidden_size']}")
        try:
            module = laion_clap.CLAP_Module(enable_fusion=audio["enable_fusion"], amodel=amodel, tmodel="roberta",
                                            device="cpu")
        except Exception as exc:  # it fetches roberta-base through transformers
            raise ReaudioError(f"clap backend 'laion' could not build its model offline ({type(exc).__name__}: "
                               f"{exc}); roberta-base must be in the local Hugging Face cache") from None
        own = module.model.state_dict()
        sd = {k: v for k, v in sd.items() if k in own or not k.endswith("position_ids")}
        module.model.load_state_dict(sd, strict=True)
        self.module = module.eval() if hasattr(module, "eval") else module
        self.num_tokens = 0
        self.config = None
        self.report = {"ignored": [], "filled": []}
        self.origin = f"laion-clap {path}"


# -- components ------------------------------------------------------------------------------------
class _ClapBase(Pretrained):
    _kind = ""

    def __init__(self, *, pretrained, processor, backend, random_init, size, config, seed, device, batch_size,
                 max_length):
        self._kwargs = dict(pretrained=pretrained, processor=processor, backend=backend, random_init=random_init,
                            size=size, config=config, seed=seed, device=device, batch_size=batch_size,
                            max_length=max_length)
        if backend not in ("transformers", "laion"):
            raise ReaudioError(f"clap: unknown backend {backend!r}. Known: transformers, laion")
        self.device = E.torch_device(device)
        self.seed, self.batch_size, self.max_length = int(seed), int(batch_size), int(max_length)
        key = {k: v for k, v in self._kwargs.items() if k not in ("batch_size", "max_length")}
        key.update(device=str(self.device), stamp=[E.stamp(pretrained), E.stamp(processor)])
        if backend == "laion":
            self._holder = E.shared(key, lambda: _LaionBundle(pretrained, config))
        else:
            def build():
                b = _load(pretrained, processor, random_init, size, config, self.seed)
                b.model.to(self.device).eval()
                return b
            self._holder = E.shared(key, build)
        self.bundle = self._holder.value
        if self.bundle.backend == "transformers":
            if self._kind == "audio" and self.bundle.text_only:
                raise ReaudioError(f"clap: {self.bundle.origin} is CLAP's text tower alone; the audio encoder needs "
                                   "a full ClapModel (a folder or checkpoint with the audio tower)")
            self.dim = self.bundle.projection_dim
            self.token_dim = self.bundle.text_width if self._kind == "text" else self.bundle.audio_width
            self.num_tokens = self.bundle.num_tokens
        else:
            self.dim, self.token_dim, self.num_tokens = self.bundle.dim, 0, 0

    @property
    def model(self):
        return self.bundle.model

    @property
    def load_report(self) -> dict:
        """What loading did: ``ignored`` checkpoint keys (unused by the embeddings), ``filled`` buffers."""
        return self.bundle.report

    def _need_transformers(self, what: str):
        if self.bundle.backend != "transformers":
            raise ReaudioError(f"clap backend 'laion' gives embeddings only; {what} needs backend=transformers "
                               "(the same checkpoint, converted)")

    # -- persistence (Pretrained) -------------------------------------------------------------------
    weights_param = "pretrained"

    def save_pretrained(self, directory) -> None:
        """``config.json`` (constructor keywords), ``model.safetensors`` (ClapModel weights),
        ``clap_config.json``, tokenizer and ``preprocessor_config.json``."""
        self._need_transformers("save_pretrained")
        super().save_pretrained(directory)

    def _config(self) -> dict:
        return {**self._kwargs, "pretrained": None, "processor": None, "random_init": False, "config": None}

    def _state_dict(self) -> dict:
        return self.model.state_dict()

    def _save_extra(self, directory) -> None:
        from ._ckpt import write_json
        write_json(directory / "clap_config.json", self.bundle.config.to_dict())
        self.bundle.tokenizer.save_pretrained(str(directory))
        if self.bundle.fe is not None:
            self.bundle.fe.save_pretrained(str(directory))

    @classmethod
    def _pretrained_params(cls, directory, overrides) -> dict:
        return E.read_component_config(cls, cls.kind, "clap", directory, overrides)

    # -- text ---------------------------------------------------------------------------------------
    def _text_batches(self, texts, max_tokens=None):
        tok = self.bundle.tokenizer
        length = max_tokens or self.max_length
        for batch in E.chunks(texts, self.batch_size):
            enc = tok(batch, padding="max_length" if max_tokens else "longest", truncation=True, max_length=length,
                      return_tensors="pt")
            ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
            yield ids, mask

    # -- audio --------------------------------------------------------------------------------------
    def _audio_inputs(self, waves: list[np.ndarray]):
        from reaudio_core.audio import resample
        fe = self.bundle.fe
        feats, longer = [], []
        for w in waves:
            w = resample(w, 16000, fe.sampling_rate).astype(np.float64)
            with E.seeded(self.seed):  # rand_trunc / fusion crops of clips longer than 10 s
                out = fe(w, sampling_rate=fe.sampling_rate, return_tensors="np")
            feats.append(np.asarray(out["input_features"][0], dtype=np.float32))
            # the true flag (the extractor marks a random clip 'longer' when none is, a training trick)
            n, hop, cap = len(w), fe.hop_length, fe.nb_max_samples
            longer.append(bool(n > cap and n // hop != cap // hop))
        x = torch.from_numpy(np.stack(feats)).to(self.device)
        return x, torch.tensor(longer, device=self.device)[:, None]


class ClapTextEncoder(_ClapBase, TextEncoder):
    """CLAP text tower: L2-normalised joint-space embeddings and RoBERTa token states."""

    _kind = "text"

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        texts = E.text_list(texts)
        if self.bundle.backend == "laion":
            if not texts:
                return torch.zeros(0, self.dim)
            with E.seeded(self.seed):
                out = self.bundle.module.get_text_embedding(texts, use_tensor=True)
            return E.normalize(out.detach().cpu())
        out = []
        for ids, mask in self._text_batches(texts):
            pooled = self.model.text_model(input_ids=ids, attention_mask=mask).pooler_output
            out.append(E.normalize(self.model.text_projection(pooled)).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    @torch.inference_mode()
    def encode_tokens(self, texts: Sequence[str], max_tokens: int | None = None):
        self._need_transformers("encode_tokens")
        texts = E.text_list(texts)
        max_tokens = E.check_max_tokens(max_tokens)
        parts = []
        for ids, mask in self._text_batches(texts, max_tokens):
            states = self.model.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
            parts.append((states.float().cpu(), mask.bool().cpu()))
        return E.cat_tokens(parts, max_tokens, self.token_dim)


class ClapAudioEncoder(_ClapBase, AudioEncoder):
    """CLAP audio tower (HTSAT): L2-normalised joint-space embeddings and time tokens."""

    _kind = "audio"

    def _run(self, waves):
        for batch in E.chunks(waves, self.batch_size):
            x, longer = self._audio_inputs(batch)
            yield self.model.audio_model(input_features=x, is_longer=longer)

    @torch.inference_mode()
    def embed(self, waveforms: Sequence[np.ndarray]) -> torch.Tensor:
        waves = E.wave_list(waveforms)
        if self.bundle.backend == "laion":
            from reaudio_core.audio import resample
            out = []
            for w in waves:
                with E.seeded(self.seed):
                    x = torch.from_numpy(resample(w, 16000, 48000))[None]
                    out.append(self.bundle.module.get_audio_embedding_from_data(x=x, use_tensor=True).detach().cpu())
            return E.normalize(torch.cat(out)) if out else torch.zeros(0, self.dim)
        out = [E.normalize(self.model.audio_projection(o.pooler_output)).cpu() for o in self._run(waves)]
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    @torch.inference_mode()
    def encode_tokens(self, waveforms: Sequence[np.ndarray]):
        self._need_transformers("encode_tokens")
        waves = E.wave_list(waveforms)
        out = []
        for o in self._run(waves):
            fmap = o.last_hidden_state  # [B, C, freq, time]
            out.append(fmap.mean(2).transpose(1, 2).float().cpu())
        tokens = torch.cat(out) if out else torch.zeros(0, self.num_tokens, self.token_dim)
        if tokens.shape[1] != self.num_tokens:
            raise ReaudioError(f"clap: HTSAT gave {tokens.shape[1]} time tokens, expected {self.num_tokens}")
        return tokens.contiguous(), torch.ones(tokens.shape[:2], dtype=torch.bool)


@hookimpl
def register_components(register):
    tiny = {"pretrained": None, "random_init": True, "size": "tiny"}  # random weights, test size
    register("text_encoder", "clap", ClapTextEncoder, tiny=tiny)
    register("audio_encoder", "clap", ClapAudioEncoder, tiny=tiny)
