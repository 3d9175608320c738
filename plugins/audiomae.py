"""AudioMAE as an audio encoder (the retrieved-audio tokens of Re-AudioLDM; reference section 3).

A timm ``VisionTransformer`` (ViT-B/16 for the published AudioMAE: 768 wide, 12 blocks, 12 heads;
1 input channel, 1024 x 128 input, no classifier) on the Kaldi fbank of the clip:

    fbank = torchaudio.compliance.kaldi.fbank(wav - mean, htk_compat=True, sample_frequency=16000,
            use_energy=False, window_type='hanning', num_mel_bins=128, dither=0.0, frame_shift=10)
    cut / zero-pad to 1024 frames;  x = (fbank + 4.2677393) / (2 * 4.5689974)

Output = mean of the last ``average_last`` (3) blocks, each passed through the final LayerNorm, CLS
dropped: 512 patch tokens on the 64 (time) x 8 (frequency) grid, pooled by
``(avg_pool + max_pool) / 2`` with window ``pool`` ((4, 4): 16 x 2 = 32 tokens of 768). The
window that gives the paper's 32 tokens is not public; (4, 4) is one choice, (2, 8) another.
``embed`` = the L2-normalised mean of the 512 patch tokens.

Weights (``pretrained``): an AudioMAE ``.pth`` (``checkpoint['model']`` with timm ViT keys; the
pretraining checkpoint's decoder -- ``decoder_*``, ``mask_token`` -- and a fine-tuned checkpoint's
``head`` are dropped; a fine-tuned checkpoint's ``fc_norm`` stands in for the missing final
``norm``), a safetensors / plain state dict with the same keys, or a folder written by
:meth:`save_pretrained`. The architecture is ``size`` (``base`` = ViT-B/16, ``tiny`` for tests) with
``config`` overrides (``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``); a checkpoint that
does not fit it is an error listing the mismatched keys. ``random_init: true`` (+ ``seed``) gives
random weights, only when asked.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from reaudio_core import AudioEncoder, Pretrained, ReaudioError, hookimpl
from reaudio_core.optional import require

from . import _encoders as E

TARGET_FRAMES = 1024
MEL_BINS = 128
PATCH = 16
FBANK_MEAN, FBANK_STD = -4.2677393, 4.5689974

SIZES: dict[str, dict] = {
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0},
    "tiny": {"embed_dim": 32, "depth": 4, "num_heads": 2, "mlp_ratio": 2.0},
}
_ARCH_KEYS = ("embed_dim", "depth", "num_heads", "mlp_ratio")
_DROPPED = ("decoder_", "mask_token", "head.")


def fbank(wav: np.ndarray) -> torch.Tensor:
    """The AudioMAE input for one 16 kHz clip: normalised Kaldi fbank ``[1024, 128]``."""
    import torchaudio
    w = torch.from_numpy(np.asarray(wav, dtype=np.float32))
    w = (w - w.mean())[None]
    if w.shape[1] < 400:  # Kaldi needs one full 25 ms window; shorter clips are zero-padded to it
        w = torch.nn.functional.pad(w, (0, 400 - w.shape[1]))
    fb = torchaudio.compliance.kaldi.fbank(w, htk_compat=True, sample_frequency=16000, use_energy=False,
                                           window_type="hanning", num_mel_bins=MEL_BINS, dither=0.0,
                                           frame_shift=10)
    n = fb.shape[0]
    fb = torch.nn.functional.pad(fb, (0, 0, 0, TARGET_FRAMES - n)) if n < TARGET_FRAMES else fb[:TARGET_FRAMES]
    return (fb - FBANK_MEAN) / (2 * FBANK_STD)


def build_vit(arch: dict):
    VisionTransformer = require("timm.models.vision_transformer", None, "the audiomae audio encoder",
                                "timm").VisionTransformer
    return VisionTransformer(img_size=(TARGET_FRAMES, MEL_BINS), patch_size=PATCH, in_chans=1, num_classes=0,
                             global_pool="token", embed_dim=int(arch["embed_dim"]), depth=int(arch["depth"]),
                             num_heads=int(arch["num_heads"]), mlp_ratio=float(arch["mlp_ratio"]), qkv_bias=True)


def audiomae_state_dict(obj: dict, path) -> tuple[dict, list[str]]:
    """The encoder weights of an AudioMAE checkpoint (timm ViT keys) and the keys dropped."""
    sd = obj.get("model", obj.get("state_dict", obj))
    if not isinstance(sd, dict):
        raise ReaudioError(f"audiomae: {path}: 'model' is a {type(sd).__name__}, not a dict of tensors")
    for prefix in ("module.", "model."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    if "patch_embed.proj.weight" not in sd:
        raise ReaudioError(f"audiomae: {path} is not an AudioMAE / timm ViT checkpoint (no patch_embed.proj.weight; "
                           f"first keys: {', '.join(list(sd)[:4])})")
    dropped = sorted(k for k in sd if k.startswith(_DROPPED))
    sd = {k: v for k, v in sd.items() if not k.startswith(_DROPPED)}
    if "norm.weight" not in sd and "fc_norm.weight" in sd:  # fine-tuned, global-pool model
        for p in ("weight", "bias"):
            sd[f"norm.{p}"] = sd.pop(f"fc_norm.{p}")
    return sd, dropped


class AudioMAEEncoder(Pretrained, AudioEncoder):
    """AudioMAE ViT on the Kaldi fbank: 32 pooled tokens per clip (reference section 3)."""

    def __init__(self, *, pretrained, random_init, size, config, seed, pool, average_last, device, batch_size):
        self._kwargs = dict(pretrained=pretrained, random_init=random_init, size=size, config=config, seed=seed,
                            pool=pool, average_last=average_last, device=device, batch_size=batch_size)
        E.random_init_check("audiomae", random_init, pretrained)
        if size not in SIZES:
            raise ReaudioError(f"audiomae: unknown size {size!r}. Known: {', '.join(SIZES)}")
        self.arch = E.merge_config(SIZES[size], config)
        extra = set(self.arch) - set(_ARCH_KEYS)
        if extra:
            raise ReaudioError(f"audiomae: unknown config key(s) {sorted(extra)}. Known: {', '.join(_ARCH_KEYS)}")
        self.pool = self._check_pool(pool)
        self.average_last = int(average_last)
        if not 1 <= self.average_last <= int(self.arch["depth"]):
            raise ReaudioError(f"audiomae: average_last must be in 1..{self.arch['depth']} (the depth), "
                               f"got {average_last}")
        self.device = E.torch_device(device)
        self.batch_size = int(batch_size)
        self.dim = self.token_dim = int(self.arch["embed_dim"])
        gt, gf = TARGET_FRAMES // PATCH, MEL_BINS // PATCH
        self.num_tokens = (gt // self.pool[0]) * (gf // self.pool[1])
        key = dict(pretrained=pretrained, random_init=random_init, arch=self.arch, seed=seed, device=str(self.device),
                   stamp=E.stamp(pretrained))
        self._holder = E.shared({"audiomae": key}, lambda: self._load(pretrained, random_init, int(seed)))
        self.vit, self.origin, self.load_report = self._holder.value

    @staticmethod
    def _check_pool(pool):
        try:
            pt, pf = (int(p) for p in pool)
        except (TypeError, ValueError):
            raise ReaudioError(f"audiomae: pool must be [time, freq] window sizes, got {pool!r}") from None
        gt, gf = TARGET_FRAMES // PATCH, MEL_BINS // PATCH
        if pt < 1 or pf < 1 or gt % pt or gf % pf:
            raise ReaudioError(f"audiomae: pool {list(pool)} must divide the {gt} x {gf} patch grid "
                               "(e.g. [4, 4] -> 32 tokens, [2, 8] -> 32, [8, 8] -> 8)")
        return pt, pf

    def _load(self, pretrained, random_init, seed):
        from ._ckpt import load_strict
        if not random_init and not pretrained:
            raise ReaudioError(
                "audiomae: no weights given. Download the AudioMAE ViT-B/16 AudioSet-2M pretrained checkpoint "
                "(pretrained.pth, linked from github.com/facebookresearch/AudioMAE) on a machine with network, "
                "copy it here and pass audio_encoder.params.pretrained=FILE; or random_init=true for random weights")
        with E.seeded(seed):
            vit = build_vit(self.arch)
        if random_init:
            return vit.to(self.device).eval(), f"random init (seed {seed})", {"ignored": []}
        path = E.resolve_local(pretrained, what="audiomae", param="pretrained")
        if path.is_dir():
            path = path / E.WEIGHTS_FILE
        sd, dropped = audiomae_state_dict(E.read_checkpoint(path), path)
        load_strict(vit, sd, f"AudioMAE checkpoint {path}",
                    hint=f"The model is {self.arch}; set size/config to the checkpoint's architecture.")
        return vit.to(self.device).eval(), f"AudioMAE {path}", {"ignored": dropped}

    # -- persistence (Pretrained): config.json + model.safetensors (timm ViT keys) ---------------------
    weights_param = "pretrained"

    def _config(self) -> dict:
        return {**self._kwargs, "pretrained": None, "random_init": False, "config": dict(self.arch),
                "pool": list(self.pool)}

    def _state_dict(self) -> dict:
        return self.vit.state_dict()

    @classmethod
    def _pretrained_params(cls, directory, overrides) -> dict:
        return E.read_component_config(cls, cls.kind, "audiomae", directory, overrides)

    # -- encoding ---------------------------------------------------------------------------------
    def _contextual(self, waves):
        """[B, 512, D]: mean of the last ``average_last`` normed blocks, CLS dropped."""
        for batch in E.chunks(waves, self.batch_size):
            x = torch.stack([fbank(w) for w in batch])[:, None].to(self.device)
            inter = self.vit.forward_intermediates(x, indices=self.average_last, norm=True, output_fmt="NLC",
                                                   intermediates_only=True)
            yield torch.stack(inter, 0).mean(0).float()

    def _pool(self, ctx: torch.Tensor) -> torch.Tensor:
        B, N, D = ctx.shape
        grid = ctx.transpose(1, 2).reshape(B, D, TARGET_FRAMES // PATCH, MEL_BINS // PATCH)
        pooled = (torch.nn.functional.avg_pool2d(grid, self.pool) + torch.nn.functional.max_pool2d(grid, self.pool)) / 2
        return pooled.flatten(2).transpose(1, 2).contiguous()

    @torch.inference_mode()
    def embed(self, waveforms: Sequence[np.ndarray]) -> torch.Tensor:
        waves = E.wave_list(waveforms)
        out = [E.normalize(ctx.mean(1)).cpu() for ctx in self._contextual(waves)]
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    @torch.inference_mode()
    def encode_tokens(self, waveforms: Sequence[np.ndarray]):
        waves = E.wave_list(waveforms)
        out = [self._pool(ctx).cpu() for ctx in self._contextual(waves)]
        tokens = torch.cat(out) if out else torch.zeros(0, self.num_tokens, self.token_dim)
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool)


@hookimpl
def register_components(register):
    register("audio_encoder", "audiomae", AudioMAEEncoder,
             tiny={"pretrained": None, "random_init": True, "size": "tiny"})  # random weights, test size
