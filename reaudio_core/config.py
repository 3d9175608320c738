"""Variant configuration: preset -> override files -> ``key=value`` dot-overrides.

A component entry is ``{name: NAME, params: {...}}``; the shorthand ``retriever=hnswlib``
(or ``retriever: hnswlib`` in YAML) means ``{name: hnswlib}``. When a later layer changes a
component's name, parameters given for the previous component are dropped. The resolved
configuration has every component's parameters filled in from the registry and is what
gets saved beside every artefact (``config.yaml``).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable

import yaml
from omegaconf import OmegaConf

from .registry import Registry, ReaudioError, UnknownName, closest, get_registry

CONFIG_FILE = "config.yaml"

#: configuration slot -> component kind. A variant has at most one component per slot;
#: two slots may hold the same kind (the prompt encoder and the caption encoder are both
#: text encoders).
SLOTS: dict[str, str] = {
    "text_encoder": "text_encoder",      # prompt condition and retrieval query (CLAP in the paper)
    "caption_encoder": "text_encoder",   # states of retrieved captions (T5 in the paper)
    "audio_encoder": "audio_encoder",    # tokens of retrieved clips (AudioMAE in the paper)
    "retriever": "retriever",
    "denoiser": "denoiser",
    "decoder": "decoder",
    "vocoder": "vocoder",
    "reranker": "audio_encoder",         # CLAP-style joint space for candidate re-ranking
}


def _normalise_component(value):
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, str):
        return {"name": value}
    raise ReaudioError(f"component entry must be a name or {{name, params}}, got {value!r}")


def _merge(base: dict, layer: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in layer.items():
        if key in SLOTS:
            value = _normalise_component(value)
            old = out.get(key)
            if value is None or old is None or value.get("name", old.get("name")) != old.get("name"):
                out[key] = copy.deepcopy(value)
            else:
                merged = dict(old)
                merged["params"] = {**(old.get("params") or {}), **(value.get("params") or {})}
                out[key] = merged
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ReaudioError(f"config file not found: {path}")
    if not path.is_file():
        raise ReaudioError(f"config file {path} is a folder, not a YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ReaudioError(f"{path}: not a text (UTF-8) YAML file ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ReaudioError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ReaudioError(f"{path}: top level must be a mapping")
    return data


def parse_dotlist(overrides: Iterable[str]) -> dict:
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item:
            raise ReaudioError(f"override '{item}' is not of the form key=value")
    return OmegaConf.to_container(OmegaConf.from_dotlist(overrides), resolve=True) if overrides else {}


def compose(preset: str | None = None, files: Iterable[str | Path] = (), overrides: Iterable[str] = (),
            registry: Registry | None = None, base: dict | None = None) -> dict:
    """Compose and validate a configuration; returns a plain resolved ``dict``."""
    reg = registry or get_registry()
    cfg = _merge({}, reg.defaults)
    if base is not None:
        cfg = _merge(cfg, base)
    layers: list[dict] = []
    file_layers = [_load_file(f) for f in files]
    # each dot-override is its own layer, applied in order: ``text_encoder=t5 text_encoder.params.x=1``
    # first switches the component, then sets a parameter of the new one
    dots = [parse_dotlist([item]) for item in overrides]
    # a preset may be named by the files or the dotlist too
    for layer in [*file_layers, *dots]:
        preset = layer.pop("preset", preset) if isinstance(layer, dict) else preset
    if preset:
        layers.append(copy.deepcopy(reg.preset(preset)))
        layers[-1].pop("description", None)
    layers += file_layers + dots
    for layer in layers:
        cfg = _merge(cfg, layer)
    cfg["preset"] = preset
    return validate(cfg, reg)


def validate(cfg: dict, registry: Registry | None = None) -> dict:
    """Check component names and parameters; fill in defaults. Unknown top-level keys are errors."""
    reg = registry or get_registry()
    known_sections = set(SLOTS) | set(reg.defaults) | {"preset"}
    for key in cfg:
        if key not in known_sections:
            raise UnknownName(f"Unknown configuration key '{key}'. {closest(key, known_sections)}")
    for section, defaults in reg.defaults.items():
        if isinstance(defaults, dict) and isinstance(cfg.get(section), dict) and section not in SLOTS:
            for key in cfg[section]:
                if key not in defaults:
                    raise UnknownName(f"Unknown key '{section}.{key}'. {closest(key, defaults)}")
    out = dict(cfg)
    for slot, kind in SLOTS.items():
        entry = _normalise_component(cfg.get(slot))
        if entry is None:
            out[slot] = None
            continue
        extra = set(entry) - {"name", "params"}
        if extra:
            raise UnknownName(f"{slot}: unknown key(s) {sorted(extra)}; a component entry has 'name' and 'params'")
        if "name" not in entry:
            raise ReaudioError(f"{slot}: missing 'name'. Known: {', '.join(reg.names(kind))}")
        out[slot] = {"name": entry["name"], "params": reg.resolve_params(kind, entry["name"], entry.get("params"))}
    return out


def save_config(cfg: dict, directory: str | Path) -> Path:
    path = Path(directory) / CONFIG_FILE
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def load_config(directory: str | Path) -> dict:
    return _load_file(Path(directory) / CONFIG_FILE)


def build(cfg: dict, slot: str, registry: Registry | None = None, **extra: Any):
    """Construct the component in ``slot`` (e.g. ``"caption_encoder"``) of a resolved config, or None."""
    entry = cfg.get(slot)
    if entry is None:
        return None
    reg = registry or get_registry()
    return reg.create(SLOTS[slot], entry["name"], **{**entry["params"], **extra})
