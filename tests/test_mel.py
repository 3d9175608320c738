"""The reference mel front end against an independent numpy computation (reference section 1)."""
import math

import numpy as np
import pytest
import torch

from reaudio_core import ReaudioError
from reaudio_core import mel as M


# -- an independent implementation: numpy only, formulas written out here ---------------------------
def slaney_hz_to_mel(f):
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    logstep = math.log(6.4) / 27.0
    return np.where(f < min_log_hz, f / f_sp, min_log_hz / f_sp + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep)


def slaney_mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    return np.where(m < min_log_mel, m * f_sp, min_log_hz * np.exp(logstep * (m - min_log_mel)))


def numpy_slaney_basis(sr=16000, n_fft=1024, n_mels=64, fmin=0.0, fmax=8000.0):
    """librosa.filters.mel(htk=False, norm='slaney') written from its definition: triangles between
    n_mels + 2 points evenly spaced on the Slaney mel scale, each scaled to unit area (2 / width)."""
    fft_freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    hz = slaney_mel_to_hz(np.linspace(slaney_hz_to_mel(fmin), slaney_hz_to_mel(fmax), n_mels + 2))
    basis = np.zeros((n_mels, len(fft_freqs)))
    for i in range(n_mels):
        lower = (fft_freqs - hz[i]) / (hz[i + 1] - hz[i])
        upper = (hz[i + 2] - fft_freqs) / (hz[i + 2] - hz[i + 1])
        basis[i] = np.maximum(0, np.minimum(lower, upper)) * 2.0 / (hz[i + 2] - hz[i])
    return basis


def numpy_log_mel(x):
    """Reflect-pad 432, frames of 1024 every 160 (no centring), periodic Hann, |rfft|, mel, log clamp."""
    x = np.asarray(x, dtype=np.float64)
    xp = np.pad(x, (432, 432), mode="reflect")
    n_frames = 1 + (len(xp) - 1024) // 160
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(1024) / 1024)
    frames = np.stack([xp[t * 160: t * 160 + 1024] * window for t in range(n_frames)])
    mag = np.abs(np.fft.rfft(frames, axis=-1))  # [T, 513]
    return np.log(np.maximum(mag @ numpy_slaney_basis().T, 1e-5))  # [T, 64]


def make_signal(n, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    x = 0.4 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3000 * t * (1 + t)) + 0.05 * rng.standard_normal(n)
    return (x * np.linspace(1, 0.2, n)).astype(np.float32)


# -- tests -----------------------------------------------------------------------------------------
def test_mel_basis_matches_slaney_formula_and_transformers():
    ours = M.mel_basis().double().numpy()
    assert ours.shape == (64, 513)
    np.testing.assert_allclose(ours, numpy_slaney_basis(), rtol=0, atol=2e-7)
    from transformers.audio_utils import mel_filter_bank
    hf = mel_filter_bank(num_frequency_bins=513, num_mel_filters=64, min_frequency=0.0, max_frequency=8000.0,
                         sampling_rate=16000, norm="slaney", mel_scale="slaney")
    np.testing.assert_allclose(ours, hf.T, rtol=0, atol=2e-7)


def test_log_mel_matches_independent_numpy_computation():
    x = make_signal(16000 * 2 + 77)
    ours = M.log_mel(x)[0].numpy()
    ref = numpy_log_mel(x)
    assert ours.shape == ref.shape == (len(x) // 160, 64)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-4)
    assert ours.min() >= math.log(1e-5) - 1e-6


def test_reference_clip_gives_exactly_1024_frames():
    x = make_signal(M.SEGMENT_SAMPLES, seed=1)
    mel = M.waveform_to_mel(x, M.SEGMENT_FRAMES)
    assert mel.shape == (1, 1024, 64) and mel.dtype == torch.float32
    assert M.log_mel(x).shape == (1, 1024, 64)
    assert M.samples_to_frames(163_840) == 1024 == M.seconds_to_frames(10.24)
    # the recipe = normalise, then the plain log-mel; checked against numpy on the first frames
    ref = numpy_log_mel(M.normalize_waveform(x.astype(np.float64)))
    np.testing.assert_allclose(mel[0].numpy(), ref, rtol=0, atol=2e-4)


@pytest.mark.parametrize("n,frames", [(160, 1), (200, 1), (432, 2), (433, 2), (1000, 6), (16000, 100), (16159, 100)])
def test_frame_count_is_samples_floor_divided_by_hop(n, frames):
    x = make_signal(n)
    mel = M.log_mel(x)
    assert mel.shape == (1, frames, 64) and torch.isfinite(mel).all()
    if n > 432:  # numpy's reflect pad needs the same minimum length
        np.testing.assert_allclose(mel[0].numpy(), numpy_log_mel(x), atol=2e-4)


def test_batch_equals_one_by_one_and_accepts_tensors():
    xs = np.stack([make_signal(4000, seed=s) for s in range(3)])
    batch = M.log_mel(torch.from_numpy(xs))
    assert batch.shape == (3, 25, 64)
    for i in range(3):
        torch.testing.assert_close(batch[i], M.log_mel(xs[i])[0], rtol=0, atol=1e-5)


def test_normalize_waveform():
    x = make_signal(5000) + 0.3
    y = M.normalize_waveform(x)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == x.shape
    assert abs(y.mean()) < 1e-3 and abs(np.abs(y).max() - 0.5) < 1e-6
    expected = (x - x.mean()) / (np.abs(x - x.mean()).max() + 1e-8) * 0.5
    np.testing.assert_allclose(y, expected, atol=1e-6)
    yt = M.normalize_waveform(torch.from_numpy(np.stack([x, 2 * x])))
    assert torch.is_tensor(yt) and torch.allclose(yt[0], yt[1], atol=1e-6)
    assert not M.normalize_waveform(np.zeros(100, np.float32)).any()  # silence stays silence


def test_pad_or_crop():
    x = np.arange(10, dtype=np.float32)
    assert M.pad_or_crop(x, 4).tolist() == [0, 1, 2, 3]
    assert M.pad_or_crop(x, 12).tolist() == list(range(10)) + [0, 0]
    mel = torch.zeros(2, 5, 64)
    padded = M.pad_or_crop(mel, 8, dim=1, value=M.LOG_FLOOR)
    assert padded.shape == (2, 8, 64) and padded[:, 5:].eq(M.LOG_FLOOR).all()
    assert M.pad_or_crop(mel, 3, dim=1).shape == (2, 3, 64)
    wav = M.waveform_to_mel(make_signal(1234), frames=20)
    assert wav.shape == (1, 20, 64)


def test_duration_helpers():
    assert M.frames_to_samples(1024) == 163_840
    assert M.seconds_to_samples(10.24) == 163_840
    assert M.frames_to_seconds(1024) == pytest.approx(10.24)
    assert M.seconds_to_frames(5.12) == 512
    with pytest.raises(ReaudioError, match="not a whole number.*1.23 s or 1.24 s"):
        M.seconds_to_frames(1.2345)
    assert M.seconds_to_frames(1.2345, exact=False) == 123
    for bad in (0, -1, float("nan")):
        with pytest.raises(ReaudioError, match="positive"):
            M.seconds_to_frames(bad)


def test_bad_waveforms_are_refused_clearly():
    with pytest.raises(ReaudioError, match="shorter than one mel frame"):
        M.log_mel(np.zeros(100, np.float32))
    with pytest.raises(ReaudioError, match="non-finite"):
        M.log_mel(np.full(1000, np.nan, np.float32))
    with pytest.raises(ReaudioError, match=r"\[N\] or \[B, N\]"):
        M.log_mel(np.zeros((1, 2, 1000), np.float32))
    with pytest.raises(ReaudioError, match="empty"):
        M.log_mel(np.zeros(0, np.float32))


def test_front_end_gradients_after_an_inference_mode_call():
    """The cached window and filter bank must not become inference tensors (the vocoder stage
    differentiates through the mel after generation ran under inference_mode in the same process)."""
    from reaudio_core import mel as M
    M._window.cache_clear(); M._mel_basis.cache_clear()
    with torch.inference_mode():
        M.log_mel(torch.randn(1, 1600))
    wav = torch.randn(1, 1600, requires_grad=True)
    M.log_mel(wav).sum().backward()
    assert wav.grad is not None and torch.isfinite(wav.grad).all()
