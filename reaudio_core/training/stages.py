"""Stages: data + objective + export of one trained slot (``training.stage``: vae, vocoder; ldm in
:mod:`reaudio_core.training.ldm`)."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

from .. import distributed
from ..config import SLOTS, save_config
from ..pretrained import Pretrained, component_params
from ..registry import ReaudioError, get_registry
from .components import load_or_build
from .data import Clip, ClipDataset, read_manifest_clips, scan_clips
from .objectives import VaeObjective, VocoderObjective


class Stage:
    name = ""
    export_slots: tuple[str, ...] = ()

    @property
    def routes_rows(self) -> bool:
        """True when the trained denoiser sends each batch row to one of several parts (``experts``): a step
        may leave a part without gradient, which DistributedDataParallel must be told about."""
        return isinstance(getattr(getattr(self, "denoiser", None), "model", None), torch.nn.ModuleDict)

    def __init__(self, cfg: dict, env: distributed.DistEnv, progress: bool):
        self.cfg, self.t, self.env, self.progress = cfg, cfg["training"], env, progress
        self.skipped: list[tuple[str, str]] = []

    # data ----------------------------------------------------------------------------------
    def clips(self) -> list[Clip]:
        manifests = self.t.get("manifest") or []
        if isinstance(manifests, str):
            manifests = [manifests]
        if not manifests:
            raise ReaudioError(f"the {self.name} stage needs training.manifest (CSV with path, caption, label)")
        clips, self.skipped = read_manifest_clips(manifests)
        return clips

    def make_dataset(self, clips: list[Clip], want_wave: bool = False, multiple: int = 1) -> ClipDataset:
        silence_db = (self.cfg.get("database") or {}).get("silence_db")  # index build's rule
        scan = scan_clips(clips, self.t["min_duration"], self.t["cache_audio"], self.env,
                          self.progress and self.env.is_main, silence_db=silence_db)
        self.skipped = self.skipped + scan.skipped
        if not scan.clips:
            raise ReaudioError(f"no usable training clip: all {len(clips)} were skipped "
                               f"(first: {self.skipped[0][0]}: {self.skipped[0][1]})" if self.skipped
                               else "no training clip given")
        return ClipDataset(scan, self.t["crop_seconds"], want_wave, multiple)

    def components(self) -> list:
        """Every component this stage runs (moved to the training device)."""
        return [getattr(self, s, None) for s in SLOTS]

    def prepare(self, batch: dict, device: torch.device) -> dict:
        return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def export(self, final: Path) -> None:
        raise NotImplementedError

    def export_cfg(self) -> dict:
        """The resolved config written beside the exported weights (loaded components' params)."""
        cfg = copy.deepcopy(self.cfg)
        for slot in self.export_slots:
            comp = getattr(self, slot, None)
            params = component_params(comp) if comp is not None else None
            if params is not None and cfg.get(slot):
                known = set(get_registry().spec(SLOTS[slot], cfg[slot]["name"]).parameters())
                cfg[slot]["params"] = {**cfg[slot]["params"], **{k: v for k, v in params.items() if k in known}}
        return cfg


class VaeStage(Stage):
    name = "vae"
    export_slots = ("decoder",)

    def __init__(self, cfg, env, progress):
        super().__init__(cfg, env, progress)
        if cfg.get("decoder") is None:
            raise ReaudioError("the vae stage trains the decoder slot: set decoder (e.g. decoder: vae)")
        clips = self.clips()
        self.decoder = load_or_build(cfg, "decoder")
        self.dataset = self.make_dataset(clips, multiple=self.decoder.compression)
        self.objective = VaeObjective(self.decoder, self.t["recon_loss"], float(self.t["kl_weight"]),
                                      float(self.t["adversarial_weight"]))
        self.freeze_encoder = bool(self.t["freeze_encoder"])
        if self.freeze_encoder:
            # A better decoder for an LDM already trained on this VAE's latents: the encoder (and so the
            # latent space and its scale_factor) stays exactly as loaded; only the decoder side trains.
            if not cfg["decoder"].get("params", {}).get("checkpoint"):
                raise ReaudioError("training.freeze_encoder needs a trained VAE to start from: set "
                                   "decoder.params.checkpoint=DIR (OUT/final/decoder of a vae run)")
            self.objective.ae.encoder.requires_grad_(False)
            self.objective.ae.quant_conv.requires_grad_(False)

    @torch.no_grad()
    def measure_scale_factor(self, mel: torch.Tensor, seed: int) -> float:
        """``1 / std(z)`` of posterior samples of one batch (reference section 2)."""
        ae = self.objective.ae
        was = ae.training
        ae.eval()
        g = torch.Generator(device=mel.device).manual_seed(seed)
        z = self.decoder.posterior(mel).sample(generator=g)
        ae.train(was)
        std = float(z.float().std())
        if not math.isfinite(std) or std <= 0:
            raise ReaudioError(f"cannot measure the VAE scale factor: latent std is {std}")
        return 1.0 / std

    def finish(self, first_batch: dict, seed: int) -> None:
        if self.freeze_encoder:  # same encoder, same latents: the LDM's scale_factor must not move
            self.scale_factor = self.decoder.scale_factor
            return
        self.scale_factor = self.measure_scale_factor(first_batch["mel"], seed)
        self.decoder.scale_factor = self.scale_factor

    def export(self, final: Path) -> None:
        self.decoder.save_pretrained(final / "decoder")
        save_config(self.export_cfg(), final)


class VocoderStage(Stage):
    name = "vocoder"
    export_slots = ("vocoder",)

    def __init__(self, cfg, env, progress):
        super().__init__(cfg, env, progress)
        if cfg.get("vocoder") is None:
            raise ReaudioError("the vocoder stage trains the vocoder slot: set vocoder (e.g. vocoder: hifigan)")
        clips = self.clips()
        self.vocoder = load_or_build(cfg, "vocoder")
        self.dataset = self.make_dataset(clips, want_wave=True)
        if not isinstance(self.vocoder, Pretrained):
            raise ReaudioError(f"vocoder '{cfg['vocoder']['name']}' has no weights to train")
        self.objective = VocoderObjective(self.vocoder, float(self.t["stft_loss_weight"]))

    def export(self, final: Path) -> None:
        self.vocoder.save_pretrained(final / "vocoder")
        save_config(self.export_cfg(), final)
