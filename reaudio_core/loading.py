"""Loading a variant's components from saved weights: every override of a saved component is applied or
refused (never dropped), and what ran is recorded (see :mod:`reaudio_core.pipeline`'s docstring for the
record's shape); also ``pkg:`` paths to data shipped inside an installed package (:func:`resolve_path`).

:meth:`reaudio_core.pipeline.ReAudioPipeline.from_config` calls :func:`_load_slot` for each slot whose
weights are in a model directory, :func:`_sources` for slots built from their parameters, and
:func:`_retriever_change` for what a database may be searched with.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

from .config import CONFIG_FILE, RECORD_KEY, SLOTS, build, compose, load_config
from .pretrained import component_params
from .registry import ReaudioError, get_registry

#: component parameters that name weights to load (the first one a component has is its weights key)
WEIGHT_KEYS = ("checkpoint", "weights", "pretrained")
PKG_PREFIX = "pkg:"


# -- applying and recording what the configuration asks of saved weights ------------------------------------
def _ref(spec: str | Path, resolved: Path, *parts: str) -> str:
    """How a record names ``resolved / parts``: the ``pkg:`` spelling when it was given so, else absolute."""
    if str(spec).startswith(PKG_PREFIX):
        return "/".join([str(spec).rstrip("/"), *parts])
    return str(Path(resolved, *parts).expanduser().resolve())


def _source(value) -> str:
    """A weights parameter's value as recorded: an existing local path made absolute, else as given (an id)."""
    path = Path(str(value)).expanduser()
    return str(path.resolve()) if not str(value).startswith(PKG_PREFIX) and path.exists() else str(value)


def _weight_key(kind: str, name: str) -> str | None:
    params = get_registry().spec(kind, name, available=False).parameters()
    return next((k for k in WEIGHT_KEYS if k in params), None)


def _sources(kind: str, params: dict) -> str | dict | None:
    """Where parameters alone point a component's weights: its weights key, else per nested component entry
    (``{name, params}``, e.g. experts' high/low) theirs; None when they name none."""
    for key in WEIGHT_KEYS:
        if params.get(key):
            return _source(params[key])
    parts = {k: _sources(kind, v.get("params") or {}) for k, v in params.items()
             if isinstance(v, dict) and "name" in v}
    parts = {k: v for k, v in parts.items() if v is not None}
    return parts or None


def _asked_weights(kind: str, entry: dict) -> bool:
    """Whether ``entry``'s own weights parameter names weights other than its registry default."""
    defaults = get_registry().spec(kind, entry["name"], available=False).defaults
    return any(entry["params"].get(k) and entry["params"][k] != defaults.get(k) for k in WEIGHT_KEYS)


def _baselines(cfg: dict, model_dir: Path | None) -> list[dict]:
    """The configurations ``cfg`` may have started from, before the caller's changes: the model directory's
    saved one (first, when there is one), the preset's. Those that cannot be composed are left out."""
    out = []
    if model_dir is not None and (model_dir / CONFIG_FILE).is_file():
        saved = load_config(model_dir)
        with contextlib.suppress(ReaudioError):
            out.append(compose(None, base={k: v for k, v in saved.items() if k not in ("preset", RECORD_KEY)}))
    if cfg.get("preset"):
        with contextlib.suppress(ReaudioError):
            out.append(compose(cfg["preset"]))
    return out


def _changes(new: dict, old: dict, path: tuple = ()) -> dict[tuple, tuple]:
    """Parameter paths where ``new`` differs from ``old`` -> (new value, old value); mappings are walked."""
    out = {}
    for key in [*new, *(k for k in old if k not in new)]:
        a, b = new.get(key), old.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(_changes(a, b, path + (key,)))
        elif a != b:
            out[path + (key,)] = (a, b)
    return out


def _dotted(slot: str, path: tuple) -> str:
    return ".".join((slot, "params", *path))


def _load_slot(cfg: dict, slot: str, folder: Path, folder_ref: str, base: dict | None):
    """``(component, weights record)`` for a slot whose saved weights are in ``folder``, applying or refusing
    every change of ``cfg[slot]`` against ``base`` (the slot's entry in the baseline configuration)."""
    reg = get_registry()
    kind, entry = SLOTS[slot], cfg[slot]
    spec = reg.spec(kind, entry["name"])
    if base is not None and base["name"] != entry["name"]:
        if not _asked_weights(kind, entry):
            raise ReaudioError(f"{slot} '{entry['name']}' cannot use the weights in {folder}: they were saved for "
                               f"'{base['name']}'. Give its weights ({slot}.params.checkpoint=PATH) or a model "
                               f"directory that holds one (--model DIR)")
        changes = {}
    elif base is not None:
        changes = {p: v for p, (v, _) in _changes(entry["params"], base["params"]).items()}
    else:  # no saved configuration to compare with: only weights parameters are known to be asked for
        changes = {(k,): v for k, v in entry["params"].items() if k in WEIGHT_KEYS and v}
    weights = {p: v for p, v in changes.items() if p[-1] in WEIGHT_KEYS and v is not None}
    other = {p: v for p, v in changes.items() if p[-1] not in WEIGHT_KEYS}
    if any(len(p) == 1 for p in weights) or (base is not None and base["name"] != entry["name"]):
        component = build(cfg, slot)  # its own weights instead of the folder's
        source = _sources(kind, entry["params"])
    elif weights:  # a part's weights (experts' high / low): the other parts keep the folder's
        params = copy.deepcopy(entry["params"])
        source = {}
        for key, part in params.items():
            if not (isinstance(part, dict) and "name" in part):
                continue
            given = _sources(kind, part.get("params") or {})
            wkey = _weight_key(kind, part["name"])
            if given is None and wkey and (folder / key).is_dir():
                part["params"] = {**(part.get("params") or {}), wkey: str(folder / key)}
                given = f"{folder_ref}/{key}"
            source[key] = given
        component = reg.create(kind, entry["name"], **params)
    else:
        nested = [p for p in other if len(p) > 1]
        if nested:
            p = nested[0]
            raise ReaudioError(f"{_dotted(slot, p)}={other[p]!r} cannot be applied to the {slot} loaded from {folder}: "
                               f"the parts of a saved component keep their saved parameters. Give that part its own "
                               f"weights ({_dotted(slot, (p[0], 'params', 'checkpoint'))}=PATH) or leave it as saved")
        overrides = {p[0]: v for p, v in other.items()}
        try:
            component = reg.wrap(kind, entry["name"], spec.cls.from_pretrained(folder, **overrides))
        except (ReaudioError, TypeError, ValueError) as exc:
            if not overrides:
                raise
            asked = ", ".join(f"{_dotted(slot, (k,))}={v!r}" for k, v in overrides.items())
            raise ReaudioError(f"{asked} cannot be applied to the {slot} loaded from {folder} ({exc}). Give weights "
                               f"that fit it ({slot}.params.checkpoint=PATH) or leave it as saved") from None
        source = folder_ref
    _sync(cfg, slot, component, other, source)
    return component, source


def _sync(cfg: dict, slot: str, component, asked: dict, source) -> None:
    """Refuse a change ``asked`` (path -> value) that the loaded component does not report back; record the
    parameters it took from its weights (top-level values the configuration states otherwise)."""
    reported = component_params(component) if source is not None else None
    if not reported:
        return
    missing = object()
    for path, value in asked.items():
        got = reported
        for key in path:
            got = got.get(key, missing) if isinstance(got, dict) else missing
        if path[-1] != "device" and got is not missing and got != value:
            raise ReaudioError(f"{_dotted(slot, path)}={value!r} was not applied: the {slot} loaded from {source} has "
                               f"{'.'.join(path)}={got!r}, fixed by its weights. Give weights that fit it "
                               f"({slot}.params.checkpoint=PATH) or leave it as saved")
    params = cfg[slot]["params"]
    for key, value in reported.items():
        if key in params and key not in (*WEIGHT_KEYS, "device") and not isinstance(value, dict) \
                and params[key] != value:
            params[key] = value


def _retriever_change(cfg: dict, bases: list[dict]) -> dict | None:
    """What the caller changed of the retriever, ``{name?, params}``, or None: nothing when it is the one of
    a configuration ``cfg`` started from (the saved model's, the preset's), else the change from the first."""
    want, olds = cfg.get("retriever"), [b["retriever"] for b in bases if b.get("retriever")]
    if want is None or not olds or want in olds:
        return None
    was = olds[0]
    if want["name"] != was["name"]:
        defaults = get_registry().resolve_params("retriever", want["name"], {})
        return {"name": want["name"], "params": {k: v for k, v in want["params"].items() if defaults.get(k) != v}}
    return {"params": {k: v for k, v in want["params"].items() if was["params"].get(k) != v}}


def resolve_path(value: str | Path | None) -> Path | None:
    """A filesystem path, or ``pkg:PACKAGE/REL/PATH`` for data shipped inside an installed package
    (e.g. ``pkg:reaudio_plugins/weights/offline``, the offline preset). Nothing is executed beyond
    importing the named package, which must already be an installed reaudio plugin package."""
    if value is None or value == "":
        return None
    text = str(value)
    if not text.startswith(PKG_PREFIX):
        return Path(text).expanduser()
    package, _, rel = text[len(PKG_PREFIX):].partition("/")
    from importlib.util import find_spec
    spec = find_spec(package) if package.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise ReaudioError(f"{text}: no installed package '{package}'")
    return Path(list(spec.submodule_search_locations)[0]) / rel
