"""VGGish feature model for FAD (reference section 6), in harritaylor/torchvggish's checkpoint layout.

Weights: the state dict of ``vggish-10086976.pth`` (torchvggish releases; torch.hub stores it in
``~/.cache/torch/hub/checkpoints/``): ``features.{0,3,6,8,11,13}.{weight,bias}`` (six 3x3 convs,
max-pooled after the 1st, 2nd, 4th and 6th) and ``embeddings.{0,2,4}.{weight,bias}``
(12288 -> 4096 -> 4096 -> 128). As audioldm_eval computes FAD: no PCA / quantisation
post-processing and the final ReLU removed, so a frame is the raw 128-d embedding.

Input examples (the TF VGGish front end): 16 kHz, 25 ms periodic-Hann frames every 10 ms,
512-point FFT magnitude, 64 HTK-mel bands 125-7500 Hz (DC bin zeroed), ``log(mel + 0.01)``,
cut into non-overlapping 0.96 s examples of 96 x 64. Clips shorter than one example
(0.975 s) are zero-padded to one.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from reaudio_core import hookimpl
from reaudio_core.interfaces import FeatureModel
from reaudio_core.registry import ReaudioError

from ._features import check_keys, find_default, load_state_dict, pad_to, state_fingerprint

VERSION = "vggish-frontend-v1"
SR, WIN, HOP, NFFT = 16000, 400, 160, 512
BANDS, FMIN, FMAX, LOG_OFFSET, EXAMPLE = 64, 125.0, 7500.0, 0.01, 96
MIN_SAMPLES = WIN + (EXAMPLE - 1) * HOP  # one full example
DEFAULT_PATHS = ("~/.cache/torch/hub/checkpoints/vggish-10086976.pth", "~/.cache/reaudio/weights/vggish-10086976.pth")
PCA_KEYS = ("pproc.",)  # torchvggish's PCA post-processor: present in some saved models, unused here


def _hz_to_mel(f):
    return 1127.0 * np.log1p(np.asarray(f, dtype=np.float64) / 700.0)


def mel_matrix() -> torch.Tensor:
    """``[257, 64]`` triangular HTK-mel weights over linear FFT bins (DC bin zero)."""
    bins_mel = _hz_to_mel(np.linspace(0.0, SR / 2, NFFT // 2 + 1))
    edges = np.linspace(_hz_to_mel(FMIN), _hz_to_mel(FMAX), BANDS + 2)
    lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]
    up = (bins_mel[:, None] - lo) / (mid - lo)
    down = (hi - bins_mel[:, None]) / (hi - mid)
    w = np.maximum(0.0, np.minimum(up, down))
    w[0, :] = 0.0
    return torch.from_numpy(w.astype(np.float32))


def examples(wav: np.ndarray, mel_w: torch.Tensor) -> torch.Tensor:
    """1-D 16 kHz waveform -> ``[n, 1, 96, 64]`` log-mel examples."""
    x = torch.from_numpy(pad_to(wav, MIN_SAMPLES))
    frames = x.unfold(0, WIN, HOP) * torch.hann_window(WIN, periodic=True)
    mag = torch.fft.rfft(frames, n=NFFT).abs()
    logmel = torch.log(mag @ mel_w + LOG_OFFSET)  # [T, 64]
    return logmel.unfold(0, EXAMPLE, EXAMPLE).transpose(1, 2).unsqueeze(1).contiguous()


class VGGishNet(nn.Module):
    """torchvggish's VGG with the last ReLU of ``embeddings`` removed (module indices kept)."""

    def __init__(self):
        super().__init__()
        layers, c = [], 1
        for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.embeddings = nn.Sequential(nn.Linear(512 * 4 * 6, 4096), nn.ReLU(True), nn.Linear(4096, 4096),
                                        nn.ReLU(True), nn.Linear(4096, 128))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # [B, 512, 6, 4]
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # TF (NHWC) flattening order
        return self.embeddings(x)


class VGGish(FeatureModel):
    name = "vggish"
    sample_rate = SR
    num_classes = 0
    dim = 128

    def __init__(self, *, checkpoint, allow_random, device, batch_size):
        path = checkpoint or find_default(DEFAULT_PATHS)
        if path is not None:
            state = load_state_dict(path, "VGGish")
            with torch.device("meta"):  # no throw-away random init of 72M parameters
                self.net = VGGishNet()
            check_keys(self.net, state, "torchvggish VGGish", path, ignore=PCA_KEYS)
            self.net.load_state_dict({k: v.float() for k, v in state.items() if not k.startswith(PCA_KEYS)},
                                     assign=True)
        elif allow_random:
            self.net = VGGishNet()
        else:
            raise ReaudioError("vggish needs its weights: download vggish-10086976.pth (harritaylor/torchvggish "
                               "release v0.1) into ~/.cache/torch/hub/checkpoints/ or pass "
                               "checkpoint=PATH (allow_random=true only for tests)")
        self.checkpoint = str(path) if path else None
        self.net.to(device).eval().requires_grad_(False)
        self.device, self.batch_size = device, batch_size
        self.mel_w = mel_matrix()
        self.fingerprint = state_fingerprint(self.net.state_dict(), VERSION)

    @torch.inference_mode()
    def embed_frames(self, wavs: Sequence[np.ndarray]) -> list[np.ndarray]:
        ex = [examples(w, self.mel_w) for w in wavs]
        if not ex:
            return []
        flat = torch.cat(ex)
        out = torch.cat([self.net(flat[i:i + self.batch_size].to(self.device)).float().cpu()
                         for i in range(0, len(flat), self.batch_size)]).numpy()
        return list(np.split(out, np.cumsum([len(e) for e in ex])[:-1]))


@hookimpl
def register_components(register):
    register("feature_model", "vggish", VGGish, tiny={"allow_random": True})  # published size, random weights
