"""The reference audio front end (reference section 1), shared by training, the VAE, the
vocoders and evaluation.

    waveform (16 kHz mono) -> [normalise: minus mean, peak 0.5] -> [pad/crop to the clip length]
      -> reflect-pad 432 samples each side -> STFT (n_fft = win = 1024, periodic Hann, hop 160,
         center=False) -> magnitude (power 1) -> Slaney mel basis (64 bins, 0-8000 Hz)
      -> log(clamp(x, 1e-5)) -> [B, T, 64]

This is the HiFi-GAN-aligned framing of the AudioLDM training code: a clip of ``N`` samples
gives exactly ``N // 160`` frames (10.24 s = 163,840 samples -> 1024 frames), and frame ``t``
is centred on sample ``160 t + 80``. No dataset mean/std normalisation is applied.

Every function accepts a 1-D ``[N]`` or 2-D ``[B, N]`` waveform as a numpy array or a torch
tensor. :func:`log_mel` always returns a float32 tensor ``[B, T, 64]`` on the input's device.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from .interfaces import SAMPLE_RATE
from .registry import ReaudioError

N_FFT = 1024  #: FFT size = window length
WIN_LENGTH = 1024
HOP_LENGTH = 160  #: samples per mel frame (10 ms)
N_MELS = 64
F_MIN = 0.0
F_MAX = 8000.0
PAD = (N_FFT - HOP_LENGTH) // 2  #: 432 samples of reflect padding on each side
LOG_CLAMP = 1e-5  #: magnitudes below this are clamped before the log (log floor = -11.51)
PEAK = 0.5  #: peak amplitude after :func:`normalize_waveform`
MEL_FPS = SAMPLE_RATE // HOP_LENGTH  #: mel frames per second: 100 (hop 160 at 16 kHz)
SEGMENT_SECONDS = 10.24  #: the reference training clip
SEGMENT_SAMPLES = 163_840
SEGMENT_FRAMES = 1024
LOG_FLOOR = math.log(LOG_CLAMP)  #: the value of a silent mel bin


# -- duration <-> samples <-> frames -----------------------------------------------------------
def samples_to_frames(samples: int) -> int:
    """Mel frames of a clip of ``samples`` samples: ``samples // 160``."""
    return int(samples) // HOP_LENGTH


def frames_to_samples(frames: int) -> int:
    """Samples covered by ``frames`` mel frames: ``frames * 160`` (the vocoder's output length)."""
    return int(frames) * HOP_LENGTH


def seconds_to_samples(seconds: float) -> int:
    """Nearest whole number of samples at 16 kHz."""
    return int(round(float(seconds) * SAMPLE_RATE))


def seconds_to_frames(seconds: float, exact: bool = True) -> int:
    """Mel frames for ``seconds`` (100 per second); 10.24 s -> 1024.

    With ``exact`` (default) a duration that is not a whole number of 10 ms frames is an error
    naming the nearest valid durations; otherwise it is rounded down.
    """
    seconds = float(seconds)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ReaudioError(f"duration must be a positive number of seconds, got {seconds}")
    frames = seconds * MEL_FPS
    if exact and abs(frames - round(frames)) > 1e-6:
        lo = math.floor(frames)
        raise ReaudioError(f"duration {seconds} s is {frames:g} mel frames (10 ms each), not a whole number; "
                           f"use {lo / MEL_FPS:g} s or {(lo + 1) / MEL_FPS:g} s")
    return int(round(frames)) if exact else int(math.floor(frames + 1e-9))


def frames_to_seconds(frames: int) -> float:
    return int(frames) / MEL_FPS


# -- waveform helpers --------------------------------------------------------------------------
def _as_batch(wav) -> tuple[torch.Tensor, bool]:
    """``wav`` as a float32 ``[B, N]`` tensor; the flag says whether the input was 1-D."""
    if isinstance(wav, np.ndarray):
        wav = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
    elif not torch.is_tensor(wav):
        try:
            wav = torch.as_tensor(np.asarray(wav, dtype=np.float32))
        except (TypeError, ValueError):
            raise ReaudioError(f"expected a waveform array, got {type(wav).__name__}") from None
    if wav.ndim not in (1, 2):
        raise ReaudioError(f"a waveform must be [N] or [B, N], got shape {tuple(wav.shape)}")
    single = wav.ndim == 1
    wav = wav.unsqueeze(0) if single else wav
    if wav.shape[-1] == 0:
        raise ReaudioError("empty waveform: no samples")
    if wav.is_floating_point() and wav.dtype != torch.float32:
        wav = wav.float()
    elif not wav.is_floating_point():
        wav = wav.float()
    return wav, single


def normalize_waveform(wav):
    """Subtract the mean, then scale to peak 0.5: ``x / (max|x| + 1e-8) * 0.5`` (per clip / row).

    Returns the same type (numpy or torch) and shape as ``wav``. A silent clip stays silent.
    """
    is_numpy = not torch.is_tensor(wav)
    x, single = _as_batch(wav)
    x = x - x.mean(dim=-1, keepdim=True)
    x = x / (x.abs().amax(dim=-1, keepdim=True) + 1e-8) * PEAK
    x = x[0] if single else x
    return x.numpy() if is_numpy else x


def pad_or_crop(x, length: int, dim: int = -1, value: float = 0.0):
    """Zero-pad (``value``) at the end or crop the end of ``x`` along ``dim`` to ``length``.

    Works on numpy arrays and tensors: waveforms (``[N]``, ``[B, N]``) and mels
    (``pad_or_crop(mel, frames, dim=1, value=LOG_FLOOR)`` for ``[B, T, 64]``).
    """
    length = int(length)
    if length < 0:
        raise ReaudioError(f"length must be >= 0, got {length}")
    n = x.shape[dim]
    if n == length:
        return x
    if torch.is_tensor(x):
        if n > length:
            return x.narrow(dim, 0, length)
        shape = list(x.shape)
        shape[dim] = length - n
        return torch.cat([x, x.new_full(shape, value)], dim=dim)
    x = np.asarray(x)
    if n > length:
        return np.take(x, np.arange(length), axis=dim)
    widths = [(0, 0)] * x.ndim
    widths[dim] = (0, length - n)
    return np.pad(x, widths, constant_values=value)


# -- the mel front end -------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _mel_basis(device: str, dtype: torch.dtype) -> torch.Tensor:
    import torchaudio.functional as AF
    with torch.inference_mode(False):  # cached: must stay usable by autograd after an inference-mode call
        fb = AF.melscale_fbanks(n_freqs=N_FFT // 2 + 1, f_min=F_MIN, f_max=F_MAX, n_mels=N_MELS,
                                sample_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney")  # [513, 64]
        return fb.T.contiguous().to(device=device, dtype=dtype)


def mel_basis(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The Slaney mel filter bank ``[64, 513]`` (mels x FFT bins), identical to
    ``librosa.filters.mel(sr=16000, n_fft=1024, n_mels=64, fmin=0, fmax=8000)``."""
    return _mel_basis(str(device), dtype)


@lru_cache(maxsize=8)
def _window(device: str) -> torch.Tensor:
    with torch.inference_mode(False):  # cached: must stay usable by autograd after an inference-mode call
        return torch.hann_window(WIN_LENGTH, periodic=True, device=device)


def stft_magnitude(wav) -> torch.Tensor:
    """Linear STFT magnitude ``[B, 513, N // 160]`` with the reference framing.

    Clips of at least 160 samples are accepted; clips shorter than the 432-sample reflect pad
    are zero-extended first (the frame count is still ``N // 160``).
    """
    x, _ = _as_batch(wav)
    n = x.shape[-1]
    frames = n // HOP_LENGTH
    if frames == 0:
        raise ReaudioError(f"waveform of {n} samples is shorter than one mel frame ({HOP_LENGTH} samples)")
    if not torch.isfinite(x).all():
        raise ReaudioError("waveform has non-finite samples (NaN or inf)")
    if n <= PAD:  # reflect padding needs more samples than the pad width
        x = torch.nn.functional.pad(x, (0, PAD + 1 - n))
    x = torch.nn.functional.pad(x.unsqueeze(1), (PAD, PAD), mode="reflect").squeeze(1)
    spec = torch.stft(x, N_FFT, hop_length=HOP_LENGTH, win_length=WIN_LENGTH, window=_window(str(x.device)),
                      center=False, normalized=False, onesided=True, return_complex=True)
    return spec.abs()[..., :frames]


def magnitude_to_log_mel(magnitude: torch.Tensor) -> torch.Tensor:
    """STFT magnitude ``[B, 513, T]`` -> log-mel ``[B, T, 64]``."""
    mel = torch.matmul(mel_basis(magnitude.device, magnitude.dtype), magnitude)
    return torch.log(torch.clamp(mel, min=LOG_CLAMP)).transpose(1, 2).contiguous()


def log_mel(wav) -> torch.Tensor:
    """Reference log-mel of ``wav`` (``[N]`` or ``[B, N]``, 16 kHz, as given: no normalisation,
    no padding) -> float32 ``[B, N // 160, 64]``. See :func:`waveform_to_mel` for the full recipe."""
    return magnitude_to_log_mel(stft_magnitude(wav))


def waveform_to_mel(wav, frames: int | None = None, normalize: bool = True) -> torch.Tensor:
    """The training/evaluation recipe: normalise (mean 0, peak 0.5), zero-pad or crop at the
    end to ``frames * 160`` samples (default: the clip's own length rounded down to whole
    frames), then :func:`log_mel`. ``waveform_to_mel(clip, 1024)`` gives the reference
    ``[1, 1024, 64]`` input of the VAE."""
    x, _ = _as_batch(wav)
    if normalize:
        x = normalize_waveform(x)
    if frames is None:
        frames = samples_to_frames(x.shape[-1])
        if frames == 0:
            raise ReaudioError(f"waveform of {x.shape[-1]} samples is shorter than one mel frame "
                               f"({HOP_LENGTH} samples)")
    x = pad_or_crop(x, frames_to_samples(frames))
    return log_mel(x)
