"""Generation modes (reaudio_core/modes.py, longclip.py): audio-to-audio at both strength ends, inpainting,
neighbours from the input clip, long clips, and their one-line errors. Fast ones on the tiny preset (random
weights); the shipped offline preset's behaviour (near / far from the input, unmasked audio kept, a 20 s clip)
in the slow tier."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from conftest import make_clip
from reaudio_core import mel as M
from reaudio_core import modes
from reaudio_core.config import compose
from reaudio_core.database import build_database
from reaudio_core.longclip import crossfade
from reaudio_core.pipeline import ReAudioPipeline
from reaudio_core.registry import ReaudioError

CAPTIONS = ["a dog barking", "rain falling on a roof", "church bells ringing", "a siren wailing"]
FAST = dict(steps=4, duration=0.32, progress=False)  # tiny: 32 mel frames, 8 latent frames


def _db(root, embed_audio: bool):
    rows = ["path,caption,label"]
    for i, caption in enumerate(CAPTIONS):
        make_clip(root / f"c{i}.wav", seconds=0.32, freq=200 + 300 * i, seed=i)
        rows.append(f"c{i}.wav,{caption},{caption.split()[1]}")
    (root / "m.csv").write_text("\n".join(rows) + "\n")
    build_database([root / "m.csv"], root / "db", compose("tiny", [], ["database.neighbours=3",
                                                                       f"database.embed_audio={embed_audio}"]),
                   progress=False)
    return root / "db"


@pytest.fixture(scope="module")
def tiny_db(tmp_path_factory):
    return _db(tmp_path_factory.mktemp("modesdb"), True)


@pytest.fixture(scope="module")
def pipe(tiny_db):
    torch.set_num_threads(1)  # a busy 2-core machine: one thread is faster (and the tests compare within one process)
    torch.manual_seed(0)
    return ReAudioPipeline.from_config(compose("tiny", [], ["generation.k=2"]), db=tiny_db)


@pytest.fixture
def clip(tmp_path):
    """A 0.5 s stereo clip at 44.1 kHz: converted as manifests are."""
    return make_clip(tmp_path / "in.wav", seconds=0.5, sr=44100, channels=2, freq=330)


def round_trip(pipe, path, duration):
    wave, _, _ = modes.load_input(path, duration)
    return pipe.decoder.decode(pipe.decoder.encode(M.waveform_to_mel(wave, M.seconds_to_frames(duration))))


def test_strength_one_is_ordinary_generation_and_zero_the_vae_round_trip(pipe, clip):
    plain = pipe("rain", seed=3, **FAST)
    one = pipe("rain", seed=3, audio=clip, strength=1.0, **FAST)
    assert torch.equal(one.mels, plain.mels) and torch.equal(one.waveforms, plain.waveforms)
    assert one.mode == {"mode": "audio-to-audio", "input": str(clip), "strength": 1.0, "retrieve_from": "text"}
    zero = pipe("rain", seed=3, audio=clip, strength=0.0, **FAST)
    assert torch.equal(zero.mels, round_trip(pipe, clip, 0.32))
    half = pipe("rain", seed=3, audio=clip, strength=0.5, **FAST)
    assert not torch.equal(half.mels, zero.mels) and not torch.equal(half.mels, plain.mels)


@pytest.mark.parametrize("sampler", ["ddim", "dpm-solver"])
def test_strength_runs_only_the_steps_at_or_below_t0(pipe, clip, sampler, monkeypatch):
    seen = []
    inner = pipe.denoiser.__class__.__call__
    monkeypatch.setattr(pipe.denoiser.__class__, "__call__",
                        lambda self, x, t, cond: (seen.append(int(t[0])), inner(self, x, t, cond))[1])
    pipe("rain", seed=0, audio=clip, strength=0.5, sampler=sampler, **{**FAST, "steps": 10})
    assert seen and max(seen) <= 500 and len(seen) == 5  # 10 steps over 1000: the 5 at or below 500


def test_inpainting_keeps_the_known_latent_outside_the_mask(pipe, clip, monkeypatch):
    keep = modes.latent_keep([(0.08, 0.16)], 8, pipe.decoder.compression)
    assert keep.flatten().tolist() == [1, 1, 0, 0, 1, 1, 1, 1]  # 8..16 mel frames -> latent frames 2, 3
    decoded = []
    inner = pipe.decoder.decode
    monkeypatch.setattr(pipe.decoder, "decode", lambda z: (decoded.append(z), inner(z))[1])
    out = pipe("rain", seed=0, audio=clip, mask="0.08-0.16", **FAST)
    wave, _, _ = modes.load_input(clip, 0.32)
    known = pipe.decoder.encode(M.waveform_to_mel(wave, 32))
    z = decoded[-1]
    assert torch.equal(z[..., [0, 1, 4, 5, 6, 7], :], known[..., [0, 1, 4, 5, 6, 7], :])
    assert (z[..., 2:4, :] - known[..., 2:4, :]).abs().mean() > 0.1
    assert out.mode["mode"] == "inpainting" and out.mode["mask"] == [[0.08, 0.16]]


@pytest.mark.parametrize("mask, message", [
    ("1-0.5", "start < end"), ("0.1-0.2,0.15-0.3", "overlap"), ("0.1-0.5", "<= 0.32"), ("a-b", "START-END"),
    ([(0.2, 0.1)], "start < end")])
def test_bad_masks_are_one_line_errors(mask, message):
    with pytest.raises(ReaudioError, match=message):
        modes.parse_mask(mask, 0.32)


def test_mode_errors(pipe, clip, tmp_path):
    for kw, message in [(dict(strength=0.5), "needs an input clip"), (dict(mask="0-0.1"), "needs an input clip"),
                        (dict(retrieve_from="audio"), "needs an input clip"),
                        (dict(audio=clip, strength=1.5), "from 0"), (dict(audio=clip, retrieve_from="x"), "one of"),
                        (dict(audio=clip, duration=40.0), "at most")]:
        with pytest.raises(ReaudioError, match=message):
            pipe("rain", **{**FAST, **kw})
    (tmp_path / "notes.wav").write_text("not audio")
    sf.write(tmp_path / "empty.wav", np.zeros((0, 1), np.float32), 16000)
    sf.write(tmp_path / "silent.wav", np.zeros(1600, np.float32), 16000)
    for name, message in [("notes.wav", "unreadable"), ("empty.wav", "empty"), ("silent.wav", "silent"),
                          ("missing.wav", "missing")]:
        with pytest.raises(ReaudioError, match=message):
            pipe("rain", audio=tmp_path / name, **FAST)


def test_long_input_is_cut_with_a_note_and_arrays_are_accepted(pipe):
    wave = np.sin(np.arange(22050 * 2) / 10).astype(np.float32)  # 2 s at 22.05 kHz
    with pytest.warns(UserWarning, match="cut to its first 0.32 s"):
        out = pipe("rain", audio=(np.stack([wave, wave], 1), 22050), strength=0.3, **FAST)
    assert out.waveforms.shape == (1, 32 * 160) and out.mode["input"].startswith("<array")


def test_neighbours_from_the_input_clip(pipe, tiny_db):
    own = tiny_db.parent / "c2.wav"  # the bells clip: its own audio embedding is nearest
    audio = pipe("a dog barking", audio=own, retrieve_from="audio", **FAST)
    assert audio.neighbours[0][0]["caption"] == "church bells ringing"
    assert audio.neighbours[0][0]["score"] == pytest.approx(1.0, abs=1e-4)
    text = pipe("a dog barking", audio=own, **FAST).neighbours[0]
    both = pipe("a dog barking", audio=own, retrieve_from="both", **FAST).neighbours[0]
    assert [n["id"] for n in both] == [text[0]["id"], audio.neighbours[0][0]["id"]]
    assert modes.merge([{"id": 1}, {"id": 2}], [{"id": 1}, {"id": 3}], 3) == [{"id": 1}, {"id": 2}, {"id": 3}]


def test_audio_retrieval_without_audio_embeddings_names_the_build(tmp_path, clip):
    pipe = ReAudioPipeline.from_config(compose("tiny", [], ["generation.k=1"]), db=_db(tmp_path, False))
    with pytest.raises(ReaudioError, match="holds no audio embeddings.*database.embed_audio=true"):
        pipe("rain", audio=clip, retrieve_from="audio", **FAST)


def test_long_clip_windows_and_crossfade(pipe, monkeypatch):
    pipe.cfg["generation"].update(max_duration=0.32, window=0.32, overlap=0.08)
    calls = []
    inner = pipe.sample
    monkeypatch.setattr(pipe, "sample", lambda *a, **kw: (calls.append(kw), inner(*a, **kw))[1])
    try:
        out = pipe("rain", seed=0, steps=2, duration=0.8, progress=False)
    finally:
        pipe.cfg["generation"].update(max_duration=30.72, window=None, overlap=1.28)
    assert out.waveforms.shape == (1, 80 * 160) and torch.isfinite(out.waveforms).all()
    assert out.mode["windows"] == [[0.0, 0.32], [0.24, 0.56], [0.48, 0.8]]
    assert calls[0]["known"] is None and calls[1]["keep"].flatten().tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    head, tail = torch.zeros(1, 6, 2), torch.ones(1, 5, 2)
    joined = crossfade(head, tail, 3)
    assert joined.shape == (1, 8, 2) and joined[0, :, 0].tolist() == [0, 0, 0, 0.25, 0.5, 0.75, 1, 1]


# -- the shipped offline preset ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def offline():
    torch.set_num_threads(2)
    return ReAudioPipeline.from_preset("offline")


@pytest.mark.slow
def test_offline_low_strength_stays_near_the_input_high_strength_moves_away(offline, shared_data):
    clip = shared_data / "esc50-fold4" / "audio" / "4-182395-A-0.flac"  # a dog
    ref = round_trip(offline, clip, 5.12)
    dist = {s: float((offline("rain", seed=3, audio=clip, strength=s, progress=False).mels - ref).abs().mean())
            for s in (0.2, 0.8)}
    assert dist[0.2] < 1.0 and dist[0.8] > 3 * dist[0.2]  # mean |log-mel difference| to the VAE round trip


@pytest.mark.slow
def test_offline_inpainting_keeps_the_unmasked_audio(offline, shared_data):
    """Tolerance: outside the mask the mean |log-mel difference| to the VAE round trip is <= 0.1 (no frame above
    0.3; the decoder's attention spreads a little of the change); inside it is 3 times larger at least."""
    clip = shared_data / "esc50-fold4" / "audio" / "4-182395-A-0.flac"
    ref = round_trip(offline, clip, 5.12)
    out = offline("rain", seed=3, audio=clip, mask=[(2.0, 3.0)], progress=False)
    d = (out.mels - ref).abs()[0].mean(1)
    outside, inside = torch.cat([d[:200], d[300:]]), d[200:300]
    assert outside.mean() <= 0.1 and outside.max() <= 0.3 and inside.mean() >= 3 * outside.mean()


@pytest.mark.slow
def test_offline_20_second_clip(offline):
    out = offline("a dog barks", seed=0, duration=20.0, progress=False)
    assert out.waveforms.shape == (1, 20 * 16000) and torch.isfinite(out.waveforms).all()
    assert len(out.mode["windows"]) == 6 and out.mode["windows"][-1] == [18.4, 20.0]  # 4.96 s used, 1.28 s shared
    quarters = out.waveforms[0].reshape(4, -1).abs().amax(1)
    assert (quarters > 1e-3).all()  # sound in every part, not one window and silence


def test_window_trim_and_bad_long_clip_settings(pipe):
    from reaudio_core.longclip import plan
    gen = pipe.cfg["generation"]
    saved = dict(gen)
    try:
        gen.update(max_duration=0.32, window=0.32, overlap=0.08, window_trim=0.08)
        w = plan(pipe, 0.8)  # 32-frame windows using 24, overlapping by 8: starts 0, 16, 32, 48, 64
        assert (w.used, w.hop, w.count) == (24, 16, 5) and w.record["windows"][-1] == [0.64, 0.8]
        for key, value, message in [("overlap", 0.32, "between 0"), ("overlap", 0.05, "multiple"),
                                    ("window", 0.48, "beyond the model"), ("window_trim", 0.3, "shorter than")]:
            gen.update({"overlap": 0.08, "window": 0.32, "window_trim": 0.08, key: value})
            with pytest.raises(ReaudioError, match=message):
                plan(pipe, 0.8)
    finally:
        gen.clear()
        gen.update(saved)


@pytest.mark.slow  # `reaudio generate` in process, twice
def test_cli_records_the_mode_and_refuses_a_mask_without_input(tiny_db, clip, tmp_path, capsys):
    from reaudio_core.cli import main
    out = tmp_path / "out.wav"
    assert main(["generate", "rain", "-o", str(out), "--preset", "tiny", "--db", str(tiny_db), "--steps", "2",
                 "--duration", "0.32", "--audio", str(clip), "--mask", "0.1-0.2", "--strength", "0.8",
                 "--retrieve-from", "both", "--quiet"]) == 0
    gen = yaml.safe_load((tmp_path / "out.wav.config.yaml").read_text())["generation"]
    assert (gen["audio"], gen["mask"], gen["strength"], gen["retrieve_from"]) == (str(clip), "0.1-0.2", 0.8, "both")
    assert sf.info(str(out)).frames == 32 * 160
    assert main(["generate", "rain", "-o", str(out), "--preset", "tiny", "--db", str(tiny_db), "--mask", "0-1"]) == 2
    assert "needs an input clip" in capsys.readouterr().err
