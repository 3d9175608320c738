"""Variant configuration: preset -> override files -> ``key=value`` dot-overrides.

A component entry is ``{name: NAME, params: {...}}``; the shorthand ``retriever=hnswlib``
(or ``retriever: hnswlib`` in YAML) means ``{name: hnswlib}``. When a later layer changes a
component's name, parameters given for the previous component are dropped. The resolved
configuration has every component's parameters filled in from the registry and is what
gets saved beside every artefact (``config.yaml``).

A ``key=value`` override is read exactly as the same key in a file: its value is YAML read with a
safe loader (no tags beyond YAML's own, so nothing is ever constructed or run; ``1e-4`` is a float),
and an unknown key is the same error either way. Parameters merge deeply: ``denoiser.params.high.
params.checkpoint=X`` changes that one value of the ``high`` entry and keeps the rest.

``weights`` is a record, not a setting: the pipeline writes there where each weighted slot's weights
were read in the run that wrote the file (see :mod:`reaudio_core.pipeline`). A file may carry it (a
configuration saved beside an output composes again) but it is not carried over: the record of an
earlier run is left out of the composed configuration, and the run that uses it records its own. A
``key=value`` override of it is refused.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

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


#: the configuration key the pipeline records loaded weights under (written, never read)
RECORD_KEY = "weights"


def _merge_entry(old: dict | None, value: dict | None, where: str) -> dict | None:
    """A component entry overlaid with another: a new name replaces the entry (the old parameters are
    dropped), the same name merges parameters deeply. Keys other than name/params are kept, for
    :func:`validate` to reject (a file and a ``key=value`` override alike)."""
    if value is not None and not isinstance(value.get("params", {}) or {}, dict):
        raise ReaudioError(f"{where}.params must be a mapping of parameters, got {value['params']!r}")
    if value is None or old is None or value.get("name", old.get("name")) != old.get("name"):
        return copy.deepcopy(value)
    merged = {**old, **{k: copy.deepcopy(v) for k, v in value.items() if k != "params"}}
    merged["params"] = _merge_params(old.get("params") or {}, value.get("params") or {}, f"{where}.params")
    return merged


def _merge_params(old: dict, new: dict, where: str) -> dict:
    out = copy.deepcopy(old)
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            if "name" in value or "name" in out[key]:  # a nested component entry, e.g. experts' high/low
                out[key] = _merge_entry(out[key], value, f"{where}.{key}")
            else:
                out[key] = _merge_params(out[key], value, f"{where}.{key}")
        else:
            out[key] = copy.deepcopy(value)
    return out


def _merge(base: dict, layer: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in layer.items():
        if key in SLOTS:
            out[key] = _merge_entry(out.get(key), _normalise_component(value), key)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader (YAML's own tags only: nothing is constructed or run), also reading
    ``1e-4`` as a float, as YAML 1.2 does (PyYAML's YAML 1.1 wants ``1.0e-4``)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
                              list("-+0123456789."))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line saying what is wrong with a YAML text."""
    problem = getattr(exc, "problem", None) or str(exc)
    return " ".join(str(problem).split())


def _load_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ReaudioError(f"config file not found: {path}")
    if not path.is_file():
        raise ReaudioError(f"config file {path} is a folder, not a YAML file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader) or {}
    except UnicodeDecodeError as exc:
        raise ReaudioError(f"{path}: not a text (UTF-8) YAML file ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ReaudioError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ReaudioError(f"{path}: top level must be a mapping")
    return data


_KEY_PART = re.compile(r"^[A-Za-z_][\w-]*$")


def parse_dotlist(overrides: Iterable[str]) -> dict:
    """``["a.b=VALUE", ...]`` -> ``{"a": {"b": value}}``. VALUE is read as YAML, as in a file, by a safe
    loader: a tag such as ``!!python/object/apply:...`` is an error, never run. An empty VALUE is null."""
    out: dict = {}
    for item in overrides:
        key, sep, text = str(item).partition("=")
        parts = key.strip().split(".")
        if not sep or not all(_KEY_PART.match(p) for p in parts):
            raise ReaudioError(f"override '{item}' is not of the form key=value (e.g. generation.seed=3)")
        try:
            value = yaml.load(text, Loader=_Loader) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ReaudioError(f"override '{item}': the value is not plain YAML ({_yaml_problem(exc)})") from None
        node = out
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return out


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
    overrides = list(overrides)
    dots = [parse_dotlist([item]) for item in overrides]
    for item, layer in zip(overrides, dots):
        if RECORD_KEY in layer:
            raise ReaudioError(f"override '{item}': '{RECORD_KEY}' records where a run's weights were read, it does "
                               "not choose them; use --model DIR (generation.model) or <slot>.params.checkpoint=PATH")
    # a preset may be named by the files or the dotlist too
    for layer in [*file_layers, *dots]:
        preset = layer.pop("preset", preset) if isinstance(layer, dict) else preset
    if preset:
        layers.append(copy.deepcopy(reg.preset(preset)))
        layers[-1].pop("description", None)
    layers += file_layers + dots
    for layer in layers:
        cfg = _merge(cfg, layer)
    cfg.pop(RECORD_KEY, None)  # an earlier run's record: the run composing this writes its own
    cfg["preset"] = preset
    return validate(cfg, reg)


def validate(cfg: dict, registry: Registry | None = None) -> dict:
    """Check component names and parameters; fill in defaults. Unknown top-level keys are errors."""
    reg = registry or get_registry()
    known_sections = set(SLOTS) | set(reg.defaults) | {"preset", RECORD_KEY}
    for key in cfg:
        if key not in known_sections:
            raise UnknownName(f"Unknown configuration key '{key}'. {closest(key, known_sections)}")
    for key in (*reg.defaults, RECORD_KEY):
        if isinstance(reg.defaults.get(key, {}), dict) and not isinstance(cfg.get(key) or {}, dict):
            raise ReaudioError(f"'{key}' must be a mapping of keys (e.g. {key}.KEY=VALUE), got {cfg[key]!r}")
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
