"""Denoiser ``experts``: two registered denoisers split along the noise levels.

An "ensemble of expert denoisers" (Balaji et al. 2022, eDiff-I, section 4): ``high`` predicts for
timesteps ``>= boundary`` (coarse structure), ``low`` for timesteps ``< boundary`` (fine detail). Each is
any registered denoiser (``{name, params}``, ``unet-ldm`` by default); both must take the same latents
and conditions (in_channels, downsample, prompt/text/audio widths). The usual way to get a pair: train
one model on all timesteps, then continue a copy of it on ``training.timesteps: [0, boundary]``
(configs/offline-ldm-v-low.yaml; docs/training.md). Each batch row goes to the expert of its own
timestep, so mixed batches work. ``reaudio train`` trains one expert at a time (name it in the config);
``reaudio distill`` trains both at once (:attr:`ExpertDenoisers.model` holds the two torch modules).

Weights (``checkpoint``, or :meth:`ExpertDenoisers.from_pretrained`): a directory written by
:meth:`ExpertDenoisers.save_pretrained` -- ``config.json`` (``boundary`` and the two experts' names) and
the subdirectories ``high/`` and ``low/``, each its expert's own ``save_pretrained`` directory. A
checkpoint's boundary and names replace the ``boundary`` / ``high`` / ``low`` parameters. Without one,
``high.params`` and ``low.params`` build the experts; params holding only ``checkpoint`` (a directory the
expert's own ``save_pretrained`` wrote) load it as saved, sizes included.
"""
from __future__ import annotations

from pathlib import Path

import torch

from reaudio_core import Conditioning, Denoiser, Pretrained, ReaudioError, hookimpl

from ._ckpt import read_json

CONFIG_FILE = "config.json"
WIDTHS = ("in_channels", "downsample", "prompt_dim", "text_dim", "audio_dim")


def _expert(entry, weights: Path | None, device: str) -> tuple[str, Denoiser]:
    """``(name, denoiser)`` for one ``{name, params}`` entry, from ``weights`` (a save_pretrained dir) if given."""
    from reaudio_core.registry import get_registry
    if not isinstance(entry, dict) or set(entry) - {"name", "params"}:
        raise ReaudioError(f"experts: an expert is {{name: <registered denoiser>, params: {{...}}}}, got {entry!r}")
    name = entry.get("name") or "unet-ldm"
    if name == "experts":
        raise ReaudioError("experts: an expert cannot itself be 'experts'")
    reg = get_registry()
    spec = reg.spec("denoiser", name)
    params = dict(entry.get("params") or {})
    if weights is None and params.get("checkpoint") and set(params) <= {"checkpoint", "device"}:
        weights = Path(params["checkpoint"])  # only a checkpoint: load it as saved, sizes and all
    if weights is not None:
        if not issubclass(spec.cls, Pretrained):
            raise ReaudioError(f"experts: denoiser '{name}' cannot load a saved directory ({weights})")
        return name, spec.cls.from_pretrained(weights, device=device)
    if "device" in reg.resolve_params("denoiser", name, {}):
        params["device"] = device
    return name, reg.create("denoiser", name, **params)


class ExpertDenoisers(Pretrained, Denoiser):
    """``high`` above ``boundary``, ``low`` below; see the module docstring.

    ``boundary``: int in ``[1, 999]``. ``high`` / ``low``: ``{name, params}`` of a registered denoiser.
    ``checkpoint``: a :meth:`save_pretrained` directory (its boundary and names win).
    """

    def __init__(self, *, boundary, high, low, checkpoint, device):
        weights = {"high": None, "low": None}
        if checkpoint:
            root = Path(checkpoint)
            saved = read_json(root / CONFIG_FILE) if (root / CONFIG_FILE).is_file() else {}
            if not {"boundary", "high", "low"} <= set(saved):
                raise ReaudioError(f"experts: {root} is not an experts directory (save_pretrained writes a "
                                   f"{CONFIG_FILE} with boundary, high and low, and the folders high/ and low/)")
            boundary = saved["boundary"]
            high, low = {"name": saved["high"]}, {"name": saved["low"]}
            weights = {"high": root / "high", "low": root / "low"}
        if not isinstance(boundary, int) or isinstance(boundary, bool) or not 1 <= boundary <= 999:
            raise ReaudioError(f"experts: boundary must be an integer timestep in [1, 999], got {boundary!r}")
        self.boundary = boundary
        self.high_name, self.high = _expert(high, weights["high"], device)
        self.low_name, self.low = _expert(low, weights["low"], device)
        differ = [w for w in WIDTHS if getattr(self.high, w) != getattr(self.low, w)]
        if differ:
            raise ReaudioError("experts: the two experts must take the same inputs; they differ in " + ", ".join(
                f"{w} (high {getattr(self.high, w)}, low {getattr(self.low, w)})" for w in differ))
        for w in WIDTHS:
            setattr(self, w, getattr(self.high, w))
        if self.high.guidance_input != self.low.guidance_input:
            raise ReaudioError("experts: both experts or neither must take the guidance scale as an input "
                               f"(guidance_input: high {self.high.guidance_input}, low {self.low.guidance_input})")
        self.guidance_input = self.high.guidance_input
        parts = {"high": getattr(self.high, "model", None), "low": getattr(self.low, "model", None)}
        if all(isinstance(m, torch.nn.Module) for m in parts.values()):  # both trainable at once (distillation)
            self.model = torch.nn.ModuleDict(parts)
        self.loaded_from = None if checkpoint is None else str(checkpoint)

    def __call__(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        low = timesteps < self.boundary
        if bool(low.all()):
            return self.low(latents, timesteps, cond)
        if not bool(low.any()):
            return self.high(latents, timesteps, cond)
        out = torch.empty(latents.shape, dtype=torch.float32, device=latents.device)
        for mask, expert in ((low, self.low), (~low, self.high)):
            out[mask] = expert(latents[mask], timesteps[mask], cond.rows(mask))
        return out

    def route(self, timestep: int):
        """``low`` below :attr:`boundary`, ``high`` from it on (the expert that computes timestep ``timestep``)."""
        expert = self.low if int(timestep) < self.boundary else self.high
        return expert.route(timestep)

    def retrieval_parameters(self) -> list[torch.nn.Parameter]:
        """The retrieval-layer parameters of both experts (``high``'s, then ``low``'s; see
        ``UNetLDM.retrieval_parameters``); an expert without that method contributes none."""
        return [p for expert in (self.high, self.low) for p in (getattr(expert, "retrieval_parameters", list)())]

    @property
    def params(self) -> dict:
        """Constructor keywords that rebuild this component (weights apart)."""
        return {"boundary": self.boundary, "high": {"name": self.high_name, "params": self.high.params},
                "low": {"name": self.low_name, "params": self.low.params}, "checkpoint": None, "device": "cpu"}

    # save_pretrained (Pretrained): config.json (boundary, expert names) + high/ and low/ (each expert's
    # save_pretrained); no model.safetensors of its own
    def _config(self) -> dict:
        return {"boundary": self.boundary, "high": self.high_name, "low": self.low_name}

    def _save_extra(self, directory: Path) -> None:
        self.high.save_pretrained(directory / "high")
        self.low.save_pretrained(directory / "low")

    @classmethod
    def _pretrained_params(cls, directory: Path, overrides: dict) -> dict:
        """The constructor reads the directory itself (``overrides``: ``device`` only)."""
        unknown = set(overrides) - {"device"}
        if unknown:
            raise ReaudioError(f"experts: from_pretrained takes only device=, got {sorted(unknown)}")
        return dict(boundary=None, high=None, low=None, checkpoint=str(directory),
                    device=overrides.get("device", "cpu"))

    def to(self, device) -> "ExpertDenoisers":
        for expert in (self.high, self.low):
            expert.to(device)
        return self


@hookimpl
def register_components(register):
    unet = {"name": "unet-ldm", "params": {"size": "tiny", "prompt_dim": 16, "text_dim": 24, "audio_dim": 20}}
    register("denoiser", "experts", ExpertDenoisers, tiny={"high": unet, "low": unet})  # two random tiny UNets
