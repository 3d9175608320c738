"""PANNs Cnn14, 16 kHz variant, for KL / IS (reference section 6), in qiuqiangkong's checkpoint layout.

Weights: ``Cnn14_16k_mAP=0.438.pth`` (zenodo 3987831; audioldm_eval keeps it in
``~/.cache/audioldm_eval/ckpt/``), a dict ``{'model': state_dict}`` with
``spectrogram_extractor.stft.conv_{real,imag}.weight`` (STFT as a 1-D conv),
``logmel_extractor.melW``, ``bn0``, ``conv_block1..6.{conv1,conv2,bn1,bn2}``, ``fc1`` and
``fc_audioset`` (527 AudioSet classes). Front end as audioldm_eval's 16 kHz Cnn14: 512-point
Hann STFT, hop 160, centre reflect padding, power spectrum, 64 Slaney mel bands 50-8000 Hz,
``10 log10(max(x, 1e-10))``. Logits = ``fc_audioset(relu(fc1(.)))`` before the sigmoid; the
embedding (one FAD frame per clip) is the 2048-d ``relu(fc1(.))``. Clips shorter than 1 s are
zero-padded to 1 s.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reaudio_core import hookimpl
from reaudio_core.interfaces import FeatureModel
from reaudio_core.registry import ReaudioError

from ._features import by_length, check_keys, find_default, load_state_dict, pad_to, state_fingerprint

VERSION = "panns-cnn14-16k-v1"
SR, NFFT, HOP, MELS, FMIN, FMAX, CLASSES = 16000, 512, 160, 64, 50.0, 8000.0, 527
DEFAULT_PATHS = ("~/.cache/audioldm_eval/ckpt/Cnn14_16k_mAP=0.438.pth", "~/.cache/reaudio/weights/Cnn14_16k_mAP=0.438.pth")


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x, pool):
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return F.avg_pool2d(x, pool)


def _stft_kernels() -> tuple[torch.Tensor, torch.Tensor]:
    n = torch.arange(NFFT, dtype=torch.float64)
    k = torch.arange(NFFT // 2 + 1, dtype=torch.float64)[:, None]
    window = torch.hann_window(NFFT, periodic=True, dtype=torch.float64)
    angle = 2 * torch.pi * ((k * n) % NFFT) / NFFT  # exact phase, in float64
    return ((torch.cos(angle) * window)[:, None].float(), (-torch.sin(angle) * window)[:, None].float())


def front_end_state() -> dict[str, torch.Tensor]:
    """The fixed STFT kernels (Hann x DFT) and Slaney mel matrix, under their checkpoint names."""
    import torchaudio.functional as AF
    real, imag = _stft_kernels()
    return {"spectrogram_extractor.stft.conv_real.weight": real, "spectrogram_extractor.stft.conv_imag.weight": imag,
            "logmel_extractor.melW": AF.melscale_fbanks(NFFT // 2 + 1, FMIN, FMAX, MELS, SR, norm="slaney",
                                                        mel_scale="slaney")}


class Cnn14(nn.Module):
    def __init__(self):
        super().__init__()
        self.spectrogram_extractor = nn.Module()
        self.spectrogram_extractor.stft = nn.Module()
        stft = self.spectrogram_extractor.stft
        stft.conv_real = nn.Conv1d(1, NFFT // 2 + 1, NFFT, stride=HOP, bias=False)
        stft.conv_imag = nn.Conv1d(1, NFFT // 2 + 1, NFFT, stride=HOP, bias=False)
        self.logmel_extractor = nn.Module()
        self.logmel_extractor.melW = nn.Parameter(torch.empty(NFFT // 2 + 1, MELS))
        if not stft.conv_real.weight.is_meta:
            with torch.no_grad():
                for k, v in front_end_state().items():
                    self.get_parameter(k).copy_(v)
        self.bn0 = nn.BatchNorm2d(MELS)
        chans = (1, 64, 128, 256, 512, 1024, 2048)
        for i in range(6):
            setattr(self, f"conv_block{i + 1}", ConvBlock(chans[i], chans[i + 1]))
        self.fc1 = nn.Linear(2048, 2048)
        self.fc_audioset = nn.Linear(2048, CLASSES)

    def logmel(self, wav: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` -> ``[B, 1, T, 64]`` dB log-mel."""
        x = F.pad(wav[:, None, :], (NFFT // 2, NFFT // 2), mode="reflect")
        stft = self.spectrogram_extractor.stft
        power = stft.conv_real(x) ** 2 + stft.conv_imag(x) ** 2  # [B, 257, T]
        mel = power.transpose(1, 2)[:, None] @ self.logmel_extractor.melW
        return 10.0 * torch.log10(mel.clamp(min=1e-10))

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, L]`` 16 kHz -> ``(embedding [B, 2048], logits [B, 527])``."""
        x = self.bn0(self.logmel(wav).transpose(1, 3)).transpose(1, 3)
        for i in range(1, 7):
            x = getattr(self, f"conv_block{i}")(x, (2, 2) if i < 6 else (1, 1))
        x = x.mean(dim=3)
        x = x.max(dim=2).values + x.mean(dim=2)
        emb = F.relu(self.fc1(x))
        return emb, self.fc_audioset(emb)


class PannsCnn14(FeatureModel):
    name = "panns-cnn14"
    sample_rate = SR
    num_classes = CLASSES
    dim = 2048

    def __init__(self, *, checkpoint, allow_random, device, batch_size):
        path = checkpoint or find_default(DEFAULT_PATHS)
        if path is not None:
            state = load_state_dict(path, "PANNs Cnn14")
            for k, v in front_end_state().items():  # a trimmed checkpoint may lack the fixed front end
                state.setdefault(k, v)
            with torch.device("meta"):  # no throw-away random init of 80M parameters
                self.net = Cnn14()
            check_keys(self.net, state, "PANNs Cnn14 (16 kHz)", path)
            self.net.load_state_dict({k: v if k.endswith("num_batches_tracked") else v.float()
                                      for k, v in state.items()}, assign=True)
        elif allow_random:
            self.net = Cnn14()
        else:
            raise ReaudioError("panns-cnn14 needs its weights: download Cnn14_16k_mAP=0.438.pth (zenodo record "
                               "3987831) into ~/.cache/audioldm_eval/ckpt/ or pass checkpoint=PATH "
                               "(allow_random=true only for tests)")
        self.checkpoint = str(path) if path else None
        self.net.to(device).eval().requires_grad_(False)
        self.device, self.batch_size = device, batch_size
        self.fingerprint = state_fingerprint(self.net.state_dict(), VERSION)

    @torch.inference_mode()
    def _run(self, wavs: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        wavs = [pad_to(w, SR) for w in wavs]
        emb = torch.zeros(len(wavs), 2048)
        logits = torch.zeros(len(wavs), CLASSES)
        for idx, batch in by_length(wavs, self.batch_size):
            e, lg = self.net(batch.to(self.device))
            emb[idx], logits[idx] = e.float().cpu(), lg.float().cpu()
        return emb, logits

    def embed_frames(self, wavs: Sequence[np.ndarray]) -> list[np.ndarray]:
        emb, _ = self._run(wavs)
        return [e[None].numpy() for e in emb]

    def logits(self, wavs: Sequence[np.ndarray]) -> torch.Tensor:
        return self._run(wavs)[1]

    def embed_and_logits(self, wavs: Sequence[np.ndarray]) -> tuple[list[np.ndarray], torch.Tensor]:
        """Both in one forward pass (used by :mod:`reaudio_core.evaluation` when present)."""
        emb, logits = self._run(wavs)
        return [e[None].numpy() for e in emb], logits


@hookimpl
def register_components(register):
    register("feature_model", "panns-cnn14", PannsCnn14, tiny={"allow_random": True})  # published size, random weights
