"""OpenCLIP text tower as a text encoder (an alternative prompt / caption encoder for comparisons).

Only the text tower of an open-clip-torch model is built (``model``: an open_clip model name, e.g.
``ViT-B-32``; its ``text_cfg`` and ``embed_dim``); the image tower's weights are skipped.
``embed`` = the projected EOT-pooled feature, L2-normalised (``dim`` = ``embed_dim``);
``encode_tokens`` = the final-LayerNorm token states (``token_dim`` = text width), masked to the
real tokens (start, words, end). The tokenizer is open_clip's own (the BPE vocabulary ships with
the package: no download); the model always runs on its full context (77 tokens).

Weights (``pretrained``): a local open_clip checkpoint file (``open_clip_model.safetensors``,
``open_clip_pytorch_model.bin``, or a training checkpoint ``{"state_dict": {"module.…"}}``), in
the CLIP layout (``token_embedding.*``, ``transformer.*``, ``ln_final.*``, ``text_projection``) or
the custom-text layout (``text.*``); a folder written by :meth:`save_pretrained`; or a pretrained
tag of ``model`` (e.g. ``laion2b_s34b_b79k``) found in the local Hugging Face cache -- never
downloaded. ``random_init: true`` (+ ``size``:
``full`` = the named model, ``tiny`` for tests; ``config`` overrides ``embed_dim`` / ``text_cfg``
fields; ``seed``) gives random weights, only when asked.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from reaudio_core import Pretrained, ReaudioError, TextEncoder, hookimpl
from reaudio_core.optional import require

from . import _encoders as E

SIZES: dict[str, dict] = {
    "full": {},
    "tiny": {"embed_dim": 16, "text_cfg": {"width": 32, "heads": 2, "layers": 2}},
}
_NOT_TEXT = ("visual.", "logit_scale", "logit_bias")


def _open_clip(module: str = "open_clip"):
    return require(module, None, "the openclip text encoder", "open-clip-torch")


def _model_config(model: str, size: str, config) -> dict:
    open_clip = _open_clip()
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise ReaudioError(f"openclip: unknown model {model!r}. Known e.g.: "
                           f"{', '.join(open_clip.list_models()[:12])} ... (open_clip.list_models())")
    if size not in SIZES:
        raise ReaudioError(f"openclip: unknown size {size!r}. Known: {', '.join(SIZES)}")
    out = {"embed_dim": cfg["embed_dim"], "text_cfg": dict(cfg.get("text_cfg", {})),
           "quick_gelu": bool(cfg.get("quick_gelu", False))}
    out = E.merge_config(E.merge_config(out, SIZES[size]), config)
    if out["text_cfg"].get("hf_model_name"):
        raise ReaudioError(f"openclip: {model} has a Hugging Face text tower ({out['text_cfg']['hf_model_name']}); "
                           "only open_clip's own text transformer is supported (use the clap / t5 encoders)")
    return out


def _text_tower(cfg: dict):
    _build_text_tower = _open_clip("open_clip.model")._build_text_tower
    text_cfg = {**cfg["text_cfg"], "output_tokens": True}
    return _build_text_tower(int(cfg["embed_dim"]), text_cfg, quick_gelu=bool(cfg.get("quick_gelu", False)))


def text_state_dict(sd: dict, path) -> tuple[dict, list[str]]:
    """Text-tower weights of an open_clip checkpoint (either layout) and the keys skipped."""
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if any(k.startswith("text.") for k in sd):  # CustomTextCLIP layout
        text = {k[len("text."):]: v for k, v in sd.items() if k.startswith("text.")}
        skipped = sorted(k for k in sd if not k.startswith("text."))
    elif "token_embedding.weight" in sd:  # CLIP layout: the text tower's modules live at the top level
        text = {k: v for k, v in sd.items() if not k.startswith(_NOT_TEXT)}
        skipped = sorted(k for k in sd if k.startswith(_NOT_TEXT))
    else:
        raise ReaudioError(f"openclip: {path} is not an open_clip checkpoint (no token_embedding.weight or text.* "
                           f"keys; first keys: {', '.join(list(sd)[:4])})")
    unknown = [k for k in skipped if not k.startswith(_NOT_TEXT)]
    if unknown and not any(k.startswith("text.") for k in sd):
        raise ReaudioError(f"openclip: unexpected keys in {path}: {', '.join(unknown[:5])}")
    text.pop("attn_mask", None)  # a non-persistent buffer in current open_clip
    return text, skipped


def _resolve_weights(pretrained: str, model: str) -> Path:
    path = Path(pretrained).expanduser()
    if path.is_dir():  # a folder written by save_pretrained, or a hub snapshot
        for name in (E.WEIGHTS_FILE, "open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            if (path / name).is_file():
                return path / name
        raise ReaudioError(f"openclip: no weights in {path} (expected {E.WEIGHTS_FILE} or open_clip_model.safetensors)")
    if path.exists():
        return path
    open_clip = _open_clip()
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained not in tags:
        raise ReaudioError(f"openclip: pretrained {pretrained!r} is neither a file nor a pretrained tag of {model} "
                           f"(tags: {', '.join(tags) or 'none'}). Pass pretrained=FILE (an open_clip checkpoint) or "
                           "random_init=true")
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    hub = (cfg.get("hf_hub") or "").rstrip("/")
    parts = hub.split("/")
    repo = "/".join(parts[:2]) if len(parts) >= 2 else ""
    fname = parts[2] if len(parts) > 2 else None
    names = [fname] if fname else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    for name in names:
        found = E.hub_file(repo, name) if repo else None
        if found is not None:
            return found
    where = f"Hugging Face repo {repo} ({' or '.join(names)})" if repo else f"URL {cfg.get('url')}"
    raise ReaudioError(f"openclip: weights {model}/{pretrained} are not on this machine ({where}); nothing is "
                       f"downloaded. On a machine with network run `huggingface-cli download {repo or '<repo>'} "
                       f"{names[0]}` and copy the file here, then pass pretrained=FILE; or random_init=true")


class OpenClipTextEncoder(Pretrained, TextEncoder):
    """open_clip text transformer: EOT-pooled projected embedding and token states."""

    def __init__(self, *, model, pretrained, random_init, size, config, seed, device, batch_size):
        E.random_init_check("openclip", random_init, pretrained)
        self.device = E.torch_device(device)
        self.batch_size = int(batch_size)
        self.cfg = _model_config(model, size, config)
        if self.cfg["text_cfg"].get("hf_tokenizer_name"):
            raise ReaudioError(f"openclip: {model} uses a Hugging Face tokenizer; only open_clip's own BPE "
                               "tokenizer (shipped with the package) is supported offline")
        key = dict(model=model, pretrained=pretrained, random_init=random_init, cfg=self.cfg, seed=seed,
                   device=str(self.device), stamp=E.stamp(pretrained))
        self._holder = E.shared({"openclip": key}, lambda: self._load(model, pretrained, random_init, int(seed)))
        self.tower, self.origin, self.load_report = self._holder.value
        open_clip = _open_clip()
        self.tokenizer = open_clip.get_tokenizer(model, context_length=self.tower.context_length)
        self.pad_id = int(getattr(self.tower, "pad_id", 0))
        self._kwargs = dict(model=model, pretrained=pretrained, random_init=random_init, size=size, config=config,
                            seed=seed, device=device, batch_size=batch_size)
        self.dim = int(self.cfg["embed_dim"])
        self.token_dim = int(self.tower.width if hasattr(self.tower, "width") else self.cfg["text_cfg"]["width"])

    def _load(self, model, pretrained, random_init, seed):
        from ._ckpt import lightning_state_dict, load_strict
        with E.seeded(seed):
            tower = _text_tower(self.cfg)
        if random_init:
            return tower.to(self.device).eval(), f"random init (seed {seed})", {"ignored": []}
        if not pretrained:
            raise ReaudioError(f"openclip: no weights given. Pass pretrained=FILE (an open_clip checkpoint) or a "
                               f"pretrained tag of {model} in the local cache (e.g. laion2b_s34b_b79k), or "
                               "random_init=true")
        path = _resolve_weights(str(pretrained), model)
        sd, skipped = text_state_dict(lightning_state_dict(E.read_checkpoint(path)), path)
        load_strict(tower, sd, f"open_clip checkpoint {path}",
                    hint=f"The text tower is {self.cfg}; set model/config to the checkpoint's architecture.")
        return tower.to(self.device).eval(), f"open_clip {path}", {"ignored": skipped}

    # -- persistence (Pretrained): config.json (``config`` = the resolved text-tower settings) +
    # model.safetensors (the text tower, open_clip key names)
    weights_param = "pretrained"

    def _config(self) -> dict:
        return {**self._kwargs, "pretrained": None, "random_init": False, "config": self.cfg}

    def _state_dict(self) -> dict:
        return self.tower.state_dict()

    @classmethod
    def _pretrained_params(cls, directory, overrides) -> dict:
        return E.read_component_config(cls, cls.kind, "openclip", directory, overrides)

    def _run(self, texts):
        for batch in E.chunks(texts, self.batch_size):
            ids = self.tokenizer(batch).to(self.device)
            pooled, tokens = self.tower(ids)
            yield pooled.float().cpu(), tokens.float().cpu(), (ids != self.pad_id).cpu()

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        texts = E.text_list(texts)
        out = [E.normalize(p) for p, _, _ in self._run(texts)]
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    @torch.inference_mode()
    def encode_tokens(self, texts: Sequence[str], max_tokens: int | None = None):
        texts = E.text_list(texts)
        max_tokens = E.check_max_tokens(max_tokens)
        return E.cat_tokens([(t, m) for _, t, m in self._run(texts)], max_tokens, self.token_dim)


@hookimpl
def register_components(register):
    register("text_encoder", "openclip", OpenClipTextEncoder,
             tiny={"pretrained": None, "random_init": True, "size": "tiny"})  # random weights, test size
