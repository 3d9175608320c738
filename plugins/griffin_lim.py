"""Vocoder ``griffin-lim``: no weights. ``log-mel [B, T, 64]`` -> ``exp`` -> linear-frequency magnitude
by inverting the Slaney mel basis (``mel_inverse``: ``pinv`` = non-negative pseudo-inverse, or
``lstsq`` = torchaudio's InverseMelScale least squares) -> torchaudio Griffin-Lim phase recovery
(n_fft 1024, Hann, hop 160) -> ``[B, T * 160]``.

torchaudio's Griffin-Lim frames with ``center=True`` (frame ``t`` centred on sample ``160 t``);
the reference mel centres frame ``t`` on sample ``160 t + 80``, so the output is shifted by 80
samples to line up with the input clip (the first 80 samples are silent).

Runs on the device of its input. Deterministic: zero initial phase, unless ``seed`` is set (random
initial phase from that seed).
"""
from __future__ import annotations

import torch

from reaudio_core import ReaudioError, SAMPLE_RATE, Vocoder, hookimpl
from reaudio_core.mel import F_MAX, F_MIN, HOP_LENGTH, N_FFT, N_MELS, WIN_LENGTH, mel_basis

SHIFT = HOP_LENGTH // 2  #: reference frame centre (160 t + 80) minus torch's centred frame (160 t)
INVERSES = ("pinv", "lstsq")
MIN_FRAMES = 4  #: (4 * 160 - 80) samples > n_fft / 2, the least torch.stft(center=True) reflect-pads


class GriffinLim(Vocoder):
    sample_rate = SAMPLE_RATE
    hop_length = HOP_LENGTH

    def __init__(self, *, n_iter, momentum, seed, mel_inverse):
        if int(n_iter) < 0:
            raise ReaudioError(f"griffin-lim: n_iter must be >= 0, got {n_iter}")
        if not 0 <= float(momentum) < 1:
            raise ReaudioError(f"griffin-lim: momentum must be in [0, 1), got {momentum}")
        if mel_inverse not in INVERSES:
            raise ReaudioError(f"griffin-lim: mel_inverse must be one of {INVERSES}, got {mel_inverse!r}")
        self.n_iter, self.momentum, self.seed, self.mel_inverse = int(n_iter), float(momentum), seed, mel_inverse
        self._pinv = None
        self._lstsq = None

    def magnitude(self, mel: torch.Tensor) -> torch.Tensor:
        """``log-mel [B, T, 64]`` -> non-negative linear magnitude ``[B, 513, T]``."""
        m = torch.exp(mel.float()).transpose(1, 2)  # [B, 64, T]
        if self.mel_inverse == "pinv":
            if self._pinv is None:
                self._pinv = torch.linalg.pinv(mel_basis().double()).float()  # [513, 64]
            return torch.relu(torch.matmul(self._pinv.to(m.device), m))
        if self._lstsq is None:
            import torchaudio
            self._lstsq = torchaudio.transforms.InverseMelScale(
                n_stft=N_FFT // 2 + 1, n_mels=N_MELS, sample_rate=SAMPLE_RATE, f_min=F_MIN, f_max=F_MAX,
                norm="slaney", mel_scale="slaney", driver="gelsd")
        return self._lstsq.to(m.device)(m)

    def __call__(self, mel: torch.Tensor) -> torch.Tensor:
        """``mel [B, T, 64]`` log-mel -> waveform ``[B, T * 160]`` float32."""
        import torchaudio.functional as AF
        if not torch.is_tensor(mel) or mel.ndim != 3 or mel.shape[-1] != N_MELS or mel.shape[1] == 0:
            raise ReaudioError(f"griffin-lim: mel must be a tensor [B, T, {N_MELS}] with T > 0, got "
                               f"{tuple(mel.shape) if torch.is_tensor(mel) else type(mel).__name__}")
        if not torch.isfinite(mel).all():
            raise ReaudioError("griffin-lim: mel has non-finite values")
        T = mel.shape[1]
        spec = self.magnitude(mel)
        if T < MIN_FRAMES:  # torch's centred STFT needs > n_fft / 2 samples: add silent frames, crop after
            spec = torch.nn.functional.pad(spec, (0, MIN_FRAMES - T))
        frames = max(T, MIN_FRAMES)
        window = torch.hann_window(WIN_LENGTH, device=spec.device)
        dev = spec.device
        with torch.random.fork_rng(devices=[] if dev.type == "cpu" else [dev.index or 0],
                                   device_type=None if dev.type == "cpu" else dev.type):
            if self.seed is not None:
                torch.manual_seed(int(self.seed))
            wav = AF.griffinlim(spec, window, N_FFT, HOP_LENGTH, WIN_LENGTH, power=1.0, n_iter=self.n_iter,
                                momentum=self.momentum, length=frames * HOP_LENGTH - SHIFT,
                                rand_init=self.seed is not None)
        return torch.nn.functional.pad(wav, (SHIFT, 0))[:, :T * HOP_LENGTH].to(mel.device)


@hookimpl
def register_components(register):
    register("vocoder", "griffin-lim", GriffinLim, tiny={"n_iter": 4})
