"""``save_pretrained`` / ``from_pretrained`` for components with weights, from one place.

A component with weights subclasses :class:`Pretrained` next to its interface
(``class VAE(Pretrained, Decoder)``). A saved component is a folder:

* ``config.json``: the constructor keywords that rebuild it (:meth:`Pretrained._config`);
* ``model.safetensors``: its state dict (:meth:`Pretrained._state_dict`; ``None`` = no such file);
* anything else it needs (:meth:`Pretrained._save_extra`: a tokenizer, sub-folders of sub-components).

The folder is written atomically (a temporary sibling replaces it when complete). Loading is
``cls(**cls._pretrained_params(dir, overrides))``: by default the saved ``config.json`` updated by the
``overrides`` keywords, with the constructor keyword :attr:`Pretrained.weights_param` set to the folder,
from which the constructor loads the weights. A component whose folder holds more (or that also reads
foreign layouts) overrides only the hook that differs. Loading never executes code: JSON and
safetensors only.

The generic readers/writers of such folders live here too (:func:`read_json`, :func:`write_json`,
:func:`write_safetensors`, :func:`atomic_dir`); the plugins use them through ``reaudio_plugins._ckpt``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

from .io import atomic_dir, atomic_write
from .registry import ReaudioError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


# -- reading and writing a component folder ---------------------------------------------------------
def read_json(path: str | Path) -> dict:
    """A component's JSON file (``config.json`` of a saved folder): a dict, or a :class:`ReaudioError`
    naming the file and what to do when it is missing, unreadable or not a JSON object."""
    hint = ("re-save the component (save_pretrained / `reaudio train`) or restore the file; a folder from "
            "elsewhere must be the complete folder as written")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReaudioError(f"cannot read {path}: {exc}; {hint}") from None
    if not isinstance(data, dict):
        raise ReaudioError(f"{path}: expected a JSON object, found {type(data).__name__}; {hint}")
    return data


def write_json(path: str | Path, data: dict) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n",
                                                        encoding="utf-8"))


def write_safetensors(path: str | Path, state_dict: dict) -> None:
    from safetensors.torch import save_file
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


# -- the mixin ----------------------------------------------------------------------------------------
def component_params(component) -> dict | None:
    """Constructor keywords a loaded component reports (its ``config()`` or ``params``): what training exports
    and what loading checks an applied override against; None when it reports none."""
    for attr in ("config", "params"):
        value = getattr(component, attr, None)
        value = value() if callable(value) else value
        if isinstance(value, dict):
            return dict(value)
    return None


class Pretrained:
    """Mixin that saves a component to a folder and rebuilds it from one (see the module docstring).

    Subclasses implement :meth:`_config` and, when they have a state dict, :meth:`_state_dict`; they
    override :meth:`_save_extra` and :meth:`_pretrained_params` only where their folder differs.
    ``isinstance(component, Pretrained)`` is how the pipeline tells a component with weights.
    """

    #: the constructor keyword that, given a saved folder, loads the weights from it
    weights_param: ClassVar[str] = "checkpoint"

    def _config(self) -> dict:
        """Constructor keywords that rebuild this component (weights apart): ``config.json``."""
        raise NotImplementedError(f"{type(self).__name__} must implement _config() to be saved")

    def _state_dict(self) -> dict | None:
        """The tensors of ``model.safetensors``; ``None`` (the default) writes no such file."""
        return None

    def _save_extra(self, directory: Path) -> None:
        """Write any further files or sub-folders into ``directory`` (the temporary folder being saved)."""

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``directory`` atomically: ``model.safetensors``, the extra files, ``config.json``."""
        with atomic_dir(directory) as tmp:
            state = self._state_dict()
            if state is not None:
                write_safetensors(tmp / WEIGHTS_FILE, state)
            self._save_extra(tmp)
            write_json(tmp / CONFIG_FILE, self._config())

    @classmethod
    def _pretrained_params(cls, directory: Path, overrides: dict) -> dict:
        """Constructor keywords for :meth:`from_pretrained`: the saved ``config.json`` updated by
        ``overrides``, and :attr:`weights_param` = ``directory``."""
        params = {**read_json(directory / CONFIG_FILE), **overrides}
        params[cls.weights_param] = str(directory)
        return params

    @classmethod
    def from_pretrained(cls, directory: str | Path, **overrides):
        """Rebuild from a :meth:`save_pretrained` folder; ``overrides`` replace constructor keywords
        (e.g. ``device``)."""
        return cls(**cls._pretrained_params(Path(directory), overrides))
