"""The experiment file: its keys and defaults, loading with overrides, and small helpers the
other experiment modules share."""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

from ..registry import ReaudioError, closest

RETRIEVALS = ("none", "audio", "text", "audio+text")
METRICS = (("fad", "FAD", False), ("kl", "KL", False), ("is", "IS", True), ("clap_score", "CLAP", True),
           ("top1", "top-1", True))
BUCKET_SCORES = (("kl", "KL", False), ("hit", "classifier top-1", True), ("clap_cosine", "CLAP cosine", True))

#: the experiment file's keys and their defaults (not component defaults: those live in registry.yaml)
DEFAULTS: dict[str, Any] = {
    "name": None,               # default: the file's stem
    "description": "",
    "out": None,                # output directory; default runs/experiments/<name> (or --out)
    "base": [],                 # training config file(s) of the trained variants (as `reaudio train --config`)
    "overrides": [],            # key=value applied to the base
    "prepare": [],              # trainings run first when OUT/final is missing: {config, out, overrides}
    "data": {"manifest": None, "database": None, "database_config": None},
    "subset": None,             # training subset rule (null = every database item)
    "prompts": {"per_label": 1, "labels": "all", "csv": None, "name_column": None, "caption_column": None,
                "label_column": None, "first_per_name": True, "labels_from": None},
    "reference": {"from": "database", "labels": "all", "dir": None},
    "variants": [],
    "train_k": "per-variant",   # per-variant: each k trains its own model; an int: one model per retrieval type
    "seeds": [0],
    "train_per_seed": False,    # true: every seed trains its own model (training.seed = seed)
    "training_procs": 1,        # >1: trainings run under torchrun with this many processes
    "generation": {},           # generation-section overrides used at generation time (steps, guidance, ...)
    "generate_batch": 10,       # prompts per pipeline call
    "evaluation": {"features": None, "classifier": None, "clap": "auto", "is_splits": None},
    "longtail": {"buckets": [0, 1, 11, 101, 1001], "multi_label": "min", "train_labels": "subset",
                 "audioset": None, "audioset_source": "ontology", "plot_k": None},
    "threads": 1,               # torch threads for generation and evaluation (training: training.threads)
    "device": "cpu",            # cpu | cuda | auto: where generation runs
    "requires": {"gpu": False},
}
VARIANT_KEYS = {"name", "group", "retrieval", "k", "model", "preset", "config", "overrides"}


# -- small helpers --------------------------------------------------------------------------------------
def _hash(obj: Any, n: int = 10) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _listify(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _subst(value, out: str):
    if isinstance(value, str):
        return value.replace("{out}", out)
    if isinstance(value, list):
        return [_subst(v, out) for v in value]
    if isinstance(value, dict):
        return {k: _subst(v, out) for k, v in value.items()}
    return value


def _merge_defaults(defaults: dict, given: dict, where: str) -> dict:
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        if key not in defaults:
            raise ReaudioError(f"unknown key '{where}{key}' in the experiment file. {closest(key, defaults)}")
        if isinstance(defaults[key], dict) and defaults[key] and isinstance(value, dict):
            out[key] = _merge_defaults(defaults[key], value, f"{where}{key}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def _dotlist(section: str, values: dict) -> list[str]:
    import yaml
    out = []
    for key, value in values.items():
        text = yaml.safe_dump(value, default_flow_style=True).strip()
        if text.endswith("\n...") or text.endswith(" ..."):
            text = text.rsplit("...", 1)[0].strip()
        out.append(f"{section}.{key}={text}")
    return out


# -- loading --------------------------------------------------------------------------------------------
def load_experiment(path: str | Path, overrides: Sequence[str] = (), out: str | Path | None = None) -> dict:
    """The experiment file with ``key=value`` overrides applied, defaults filled, ``{out}`` substituted."""
    from ..config import _load_file, parse_dotlist
    path = Path(path)
    data = _load_file(path)

    def merged(base: dict, layer: dict) -> dict:  # mappings merge key by key; any other value replaces
        return {**base, **{k: merged(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                           for k, v in layer.items()}}
    if overrides:  # read as YAML values exactly like a file's (a tag such as !!python/... is an error, never run)
        data = merged(data, parse_dotlist(overrides))
    spec = _merge_defaults(DEFAULTS, data, "")
    spec["name"] = spec["name"] or path.stem
    spec["config_file"] = str(path)
    spec["cli_overrides"] = list(overrides)
    spec["cli_out"] = str(out) if out else None
    out_dir = Path(out or spec["out"] or Path("runs") / "experiments" / spec["name"]).expanduser()
    spec["out"] = str(out_dir.resolve())
    for key in ("base", "overrides", "prepare", "data", "subset", "prompts", "reference", "variants", "generation",
                "longtail"):
        spec[key] = _subst(spec[key], spec["out"])
    spec["base"] = _listify(spec["base"])
    spec["overrides"] = [str(o) for o in _listify(spec["overrides"])]
    spec["seeds"] = [int(s) for s in _listify(spec["seeds"])]
    if not spec["seeds"]:
        raise ReaudioError("seeds: give at least one seed, e.g. seeds: [0, 1, 2]")
    if spec["train_k"] != "per-variant" and not (isinstance(spec["train_k"], int) and spec["train_k"] >= 1):
        raise ReaudioError(f"train_k must be 'per-variant' or a positive integer, got {spec['train_k']!r}")
    if spec["device"] not in ("cpu", "cuda", "auto"):
        raise ReaudioError(f"device must be cpu, cuda or auto, got {spec['device']!r}")
    if not isinstance(spec["generate_batch"], int) or spec["generate_batch"] < 1:
        raise ReaudioError(f"generate_batch must be a positive integer, got {spec['generate_batch']!r}")
    return spec


# -- evaluation settings --------------------------------------------------------------------------------
def _evaluation_settings(spec: dict) -> dict:
    from ..registry import get_registry
    d = get_registry().defaults.get("evaluation", {}) or {}
    e = spec["evaluation"]
    return {"features": e.get("features") or d.get("features", "esc50-classifier"),
            "classifier": e.get("classifier") if e.get("classifier") is not None else d.get("classifier"),
            "clap": e.get("clap", "auto"), "is_splits": int(e.get("is_splits") or d.get("is_splits", 10)),
            "silence_db": float(d.get("silence_db", -70.0))}
