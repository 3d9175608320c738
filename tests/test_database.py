"""Retrieval database: build, retrieve, neighbour table, incremental add, bad inputs, atomicity."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import make_clip
from reaudio_core import AudioEncoder, TextEncoder, cli
from reaudio_core.config import compose
from reaudio_core.database import (PAUSE_ENV, Database, add_to_database, build_database, exact_neighbours,
                                   read_manifest, write_manifest)
from reaudio_core.registry import ComponentSpec, ReaudioError, UnknownName, get_registry

CAPTIONS = [("dog.wav", "a dog barking loudly", "dog", 300),
            ("rain.wav", "heavy rain falling on a tin roof", "rain", 900),
            ("bells.wav", "church bells ringing in the distance", "bells", 1500),
            ("car.wav", "a car engine starting and idling", "engine", 2100)]


def cfg_for(*overrides):
    """The offline preset's retrieval side (MiniLM captions), exact torch search, no audio encoder."""
    return compose("offline", [], ["retriever=torch", "audio_encoder=null", "database.embed_audio=true", *overrides])


@pytest.fixture(scope="module")
def warm_minilm():
    """Build MiniLM once per module (the database keeps built encoders for the process)."""
    from reaudio_core.database import _component
    return _component("text_encoder", cfg_for()["text_encoder"])


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def small_manifest(tmp_path: Path, entries=CAPTIONS, name="m.csv") -> Path:
    rows = []
    for i, (file, caption, label, freq) in enumerate(entries):
        make_clip(tmp_path / "audio" / file, freq=freq, seed=i)
        rows.append(f"audio/{file},{caption},{label}")
    return write_csv(tmp_path / name, "path,caption,label", rows)


def test_build_and_retrieve(tmp_path, warm_minilm):
    report = build_database([small_manifest(tmp_path)], tmp_path / "db", cfg_for(), progress=False)
    assert report.added == report.total == 4 and not report.skipped
    assert "+4 items" in report.summary()
    db = Database.open(tmp_path / "db")
    assert len(db) == 4 and db.version == "v0001"
    hits = db.retrieve("a barking dog", k=2)
    assert [h["caption"] for h in hits][0] == "a dog barking loudly"
    assert set(hits[0]) >= {"caption", "path", "label", "score", "id"}
    assert hits[0]["label"] == "dog" and Path(hits[0]["path"]).is_absolute() and Path(hits[0]["path"]).exists()
    assert hits[0]["score"] >= hits[1]["score"]
    assert db.retrieve("church bells", k=10)[0]["label"] == "bells"
    assert len(db.retrieve("rain", k=10)) == 4  # k beyond the size is clamped
    emb = db.embeddings("text")
    assert emb.shape == (4, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert db.items[2]["duration"] == pytest.approx(1.0)
    vdir = tmp_path / "db" / "v0001"
    assert (vdir / "config.yaml").exists() and (vdir / "index").is_dir()
    assert json.loads((vdir / "report.json").read_text())["added"] == 4
    assert db.config["retriever"]["name"] == "torch"
    with pytest.raises(ReaudioError, match="no audio embeddings"):
        db.embeddings("audio")
    with pytest.raises(ReaudioError, match="empty prompt"):
        db.retrieve("   ")


def test_cli_build_and_retrieve_json(tmp_path, capsys, warm_minilm):
    m = small_manifest(tmp_path)
    assert cli.main(["index", "build", "--manifest", str(m), "--out", str(tmp_path / "db"), "--quiet",
                     "retriever=torch", "database.neighbours=2"]) == 0
    capsys.readouterr()
    assert cli.main(["retrieve", "--db", str(tmp_path / "db"), "rain on the roof", "-k", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["neighbours"][0]["caption"] == "heavy rain falling on a tin roof"
    assert Database.open(tmp_path / "db").neighbours.ids.shape == (4, 2)


def test_bad_clips_and_rows_are_skipped_and_reported(tmp_path, warm_minilm):
    audio = tmp_path / "audio"
    make_clip(audio / "good.wav", freq=500)
    make_clip(audio / "multi.wav", sr=44100, channels=8, freq=700, seconds=1.0)
    (audio / "corrupt.flac").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    sf.write(str(audio / "zero.wav"), np.zeros((0, 1), np.float32), 16000)
    (audio / "nothing.wav").write_bytes(b"")
    sf.write(str(audio / "silent.wav"), np.zeros(16000, np.float32), 16000)
    make_clip(audio / "short.wav", seconds=0.02)
    make_clip(audio / "latin.wav", freq=900)
    lines = [b"path,caption,label",
             b"audio/good.wav,a good clip,ok",
             b"audio/multi.wav,eight channels at 44.1 kHz,ok",
             b"audio/corrupt.flac,random bytes,bad",
             b"audio/zero.wav,zero frames,bad",
             b"audio/nothing.wav,zero bytes,bad",
             b"audio/silent.wav,silence,bad",
             b"audio/short.wav,too short,bad",
             b"audio/missing.wav,not there,bad",
             b"audio/good.wav,,bad",
             b"audio/latin.wav,caf\xe9 ambience,bad"]
    m = tmp_path / "m.csv"
    m.write_bytes(b"\n".join(lines) + b"\n")
    report = build_database([m], tmp_path / "db", cfg_for(), progress=False)
    reasons = {s["path"]: s["reason"] for s in report.skipped}
    assert report.rows == 10 and report.added == 2 and len(report.skipped) == 8
    assert "unreadable" in reasons["audio/corrupt.flac"]
    assert "empty" in reasons["audio/zero.wav"]
    assert "unreadable" in reasons["audio/nothing.wav"]
    assert "silent" in reasons["audio/silent.wav"]
    assert "too short" in reasons["audio/short.wav"]
    assert "missing file" in reasons["audio/missing.wav"]
    assert reasons["audio/good.wav"] == "empty caption"
    assert "not valid UTF-8" in reasons["audio/latin.wav"] and "\\xe9" in reasons["audio/latin.wav"]
    assert {s["line"] for s in report.skipped} == set(range(4, 12))
    db = Database.open(tmp_path / "db")
    multi = next(it for it in db.items if it["file"] == "audio/multi.wav")
    assert multi["duration"] == pytest.approx(1.0, abs=1e-3)  # 44.1 kHz x 8 channels -> 16 kHz mono
    assert len(db.report()["skipped"]) == 8
    summary = report.summary()
    assert "8 skipped" in summary and "corrupt.flac" in summary


def test_all_rows_bad_is_an_error_and_writes_nothing(tmp_path, warm_minilm):
    m = write_csv(tmp_path / "m.csv", "path,caption", ["nope.wav,missing clip"])
    with pytest.raises(ReaudioError, match="no usable items.*missing file"):
        build_database([m], tmp_path / "db", cfg_for(), progress=False)
    assert not (tmp_path / "db").exists()  # the folder the failed build created is removed again
    with pytest.raises(ReaudioError, match="no database at"):
        Database.open(tmp_path / "db")


def test_manifest_column_aliases(tmp_path):
    make_clip(tmp_path / "audio" / "a.flac")
    esc = write_csv(tmp_path / "esc.csv", "file,category,target,esc10,caption",
                    ["audio/a.flac,dog,0,True,the sound of dog"])
    clotho = write_csv(tmp_path / "clotho.csv", "file,caption_1,caption_2,caption_3,caption_4,caption_5",
                       ['audio/a.flac,"First, with a comma.",second,third,fourth,fifth'])
    (row,), _, n = read_manifest(esc)
    assert n == 1 and row.caption == "the sound of dog" and row.label == "dog"
    assert row.path == str((tmp_path / "audio" / "a.flac").resolve())
    (row,), _, _ = read_manifest(clotho)
    assert row.caption == "First, with a comma." and row.label is None  # one item per clip: caption_1


@pytest.mark.parametrize("header,missing", [
    ("path,label", "caption column"), ("caption,label", "audio path column"),
    ("label", r"lacks an audio path column \(path \| file \| audio\) and a caption column")])
def test_manifest_missing_column_is_a_clear_error(tmp_path, capsys, header, missing):
    m = write_csv(tmp_path / "m.csv", header, [",".join(["x"] * len(header.split(",")))])
    with pytest.raises(ReaudioError, match=missing) as exc:
        read_manifest(m)
    assert f"its columns are: {header.replace(',', ', ')}" in str(exc.value)
    assert cli.main(["index", "build", "--manifest", str(m), "--out", str(tmp_path / "db"), "retriever=torch"]) == 2
    assert re.search(missing, capsys.readouterr().err)
    assert not (tmp_path / "db").exists()


def test_missing_and_empty_manifest(tmp_path):
    with pytest.raises(ReaudioError, match="manifest not found"):
        read_manifest(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ReaudioError, match="is empty"):
        read_manifest(tmp_path / "empty.csv")


def test_unknown_retriever_name_names_the_closest(tmp_path, capsys):
    with pytest.raises(UnknownName, match="Unknown retriever 'fiass'.*Did you mean 'faiss'"):
        compose("offline", [], ["retriever=fiass"])
    cfg = cfg_for()
    cfg["retriever"] = {"name": "hnswlb", "params": {}}
    with pytest.raises(UnknownName, match="Did you mean 'hnswlib'"):
        build_database([tmp_path / "unused.csv"], tmp_path / "db", cfg, progress=False)
    assert cli.main(["index", "build", "--manifest", "m.csv", "--out", str(tmp_path / "db"), "retriever=torhc"]) == 2
    assert "Did you mean 'torch'" in capsys.readouterr().err


class Wide(TextEncoder):
    dim = token_dim = 512

    def embed(self, texts):
        return torch.nn.functional.normalize(torch.ones(len(texts), 512), dim=-1)

    def encode_tokens(self, texts, max_tokens=None):
        raise NotImplementedError


def test_mismatched_embedding_dimension_when_loading(tmp_path, warm_minilm):
    build_database([small_manifest(tmp_path)], tmp_path / "db", cfg_for(), progress=False)
    with pytest.raises(ReaudioError, match="dimension mismatch.*384-d text embeddings.*gives 512-d"):
        Database.open(tmp_path / "db", text_encoder=Wide())
    with pytest.raises(ReaudioError, match="embedded with text_encoder 'minilm'.*'openclip'"):
        Database.open(tmp_path / "db", text_encoder={"name": "openclip"})
    db = Database.open(tmp_path / "db", text_encoder=warm_minilm)  # the right encoder passes
    with pytest.raises(ReaudioError, match=r"shape \(1, 512\).*384-d"):
        db.search(Wide().embed(["x"]), 3)


def test_neighbour_table_excludes_self_but_keeps_duplicates(tmp_path, warm_minilm):
    entries = CAPTIONS + [("dog2.wav", "a dog barking loudly", "dog", 320)]  # same caption, other clip
    build_database([small_manifest(tmp_path, entries)], tmp_path / "db", cfg_for(), progress=False)
    db = Database.open(tmp_path / "db")
    nb = db.neighbours
    assert nb.ids.shape == nb.scores.shape == (5, 50) and nb.modality == "text->text"
    assert (nb.ids[:, :4] >= 0).all() and (nb.ids[:, 4:] == -1).all() and np.isneginf(nb.scores[:, 4:]).all()
    for i in range(5):
        assert i not in nb.ids[i]
        assert sorted(nb.ids[i, :4]) == sorted(set(range(5)) - {i})
    assert nb.ids[0, 0] == 4 and nb.ids[4, 0] == 0 and nb.scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    emb = np.asarray(db.embeddings("text"))
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    assert np.allclose(nb.scores[:, :4], -np.sort(-sim, axis=1)[:, :4], atol=1e-5)
    # the search API can leave an item out of its own results (e.g. for training)
    _, ids = db.search(emb[[0, 1]], 2, exclude_ids=[[0, 4], 1])
    assert 0 not in ids[0] and 4 not in ids[0] and 1 not in ids[1] and (ids >= 0).all()


def test_exact_neighbours_ties_and_small_sets():
    x = np.eye(3, dtype=np.float32)[[0, 0, 0, 1]]
    ids, scores = exact_neighbours(x, x, 3)
    assert ids[0].tolist() == [1, 2, 3] and ids[1].tolist() == [0, 2, 3] and ids[3].tolist() == [0, 1, 2]
    ids, scores = exact_neighbours(x[:1], x[:1], 5)
    assert (ids == -1).all() and np.isneginf(scores).all()


def test_incremental_add(tmp_path, capsys, warm_minilm):
    build_database([small_manifest(tmp_path, CAPTIONS[:3])], tmp_path / "db", cfg_for(), progress=False)
    before = Database.open(tmp_path / "db")
    old_emb = np.array(before.embeddings("text"))
    before.save_features("cache", np.arange(3))
    wind = ("wind.wav", "wind blowing through trees", "wind", 2700)
    more = small_manifest(tmp_path, CAPTIONS[1:] + [wind], "more.csv")
    with open(more, "a") as f:
        f.write("audio/gone.wav,a clip that is not there,x\n")
    report = add_to_database(tmp_path / "db", [more], progress=False)
    assert report.added == 2 and report.total == 5
    reasons = sorted(s["reason"] for s in report.skipped)
    assert len(reasons) == 3 and sum("duplicate of item" in r for r in reasons) == 2 and "missing file" in reasons[-1]
    db = Database.open(tmp_path / "db")
    assert db.version == "v0002" and len(db) == 5 and len(db.index) == 5
    assert [it["id"] for it in db.items] == list(range(5))
    assert [it["caption"] for it in db.items[:3]] == [c[1] for c in CAPTIONS[:3]]
    np.testing.assert_array_equal(np.asarray(db.embeddings("text"))[:3], old_emb)
    assert db.retrieve("wind in the trees", 1)[0]["id"] == 4
    assert db.neighbours.ids.shape == (5, 50) and (db.neighbours.ids[:, :4] >= 0).all()
    assert db.features("cache") is None  # caches are not carried over
    assert before.features("cache") is not None  # the previous version is kept for open readers
    again = add_to_database(tmp_path / "db", [more], progress=False)
    assert again.added == 0 and "nothing added" in again.summary()
    capsys.readouterr()
    assert cli.main(["index", "add", "--db", str(tmp_path / "db"), "--manifest", str(more), "--quiet"]) == 0
    assert "nothing added" in capsys.readouterr().out
    assert Database.open(tmp_path / "db").version == "v0002"


def test_feature_cache_round_trip(tmp_path, warm_minilm):
    build_database([small_manifest(tmp_path)], tmp_path / "db", cfg_for(), progress=False)
    db = Database.open(tmp_path / "db")
    states = np.random.default_rng(0).standard_normal((4, 50, 8)).astype(np.float32)
    mask = np.ones((4, 50), bool)
    db.save_features("caption_encoder-t5-0123456789", {"states": states, "mask": mask}, info={"model": "t5"})
    db.save_features("caption_encoder-t5-0123456789", {"states": states * 2, "mask": mask})  # replace
    got = Database.open(tmp_path / "db").features("caption_encoder-t5-0123456789")
    np.testing.assert_array_equal(got["states"], states * 2)
    assert got["mask"].dtype == bool
    assert db.feature_names() == ["caption_encoder-t5-0123456789"] and db.features("other") is None
    with pytest.raises(ReaudioError, match="one row per item"):
        db.save_features("x", np.zeros((3, 2)))
    with pytest.raises(ReaudioError, match="feature name"):
        db.save_features("../escape", np.zeros((4, 2)))


class Spectrum(AudioEncoder):
    """A weight-free audio encoder for tests: a bump at the clip's peak frequency on a ``dim``-band axis."""
    token_dim = 8
    num_tokens = 1

    def __init__(self, *, dim):
        self.dim = dim

    def embed(self, waveforms):
        centres = np.linspace(0, 8000, self.dim)
        out = []
        for w in waveforms:
            peak = np.argmax(np.abs(np.fft.rfft(w[:16000], n=16000)))  # Hz (1 Hz bins)
            out.append(np.exp(-((centres - peak) / 300.0) ** 2))
        return torch.nn.functional.normalize(torch.tensor(np.stack(out), dtype=torch.float32), dim=-1)

    def encode_tokens(self, waveforms):
        raise NotImplementedError


@pytest.fixture
def spectrum_encoder(monkeypatch):
    reg = get_registry()
    spec = ComponentSpec("audio_encoder", "spectrum", "tests", {"dim": 384}, Spectrum, "tests", "0")
    monkeypatch.setitem(reg.components, ("audio_encoder", "spectrum"), spec)


def test_audio_modalities(tmp_path, warm_minilm, spectrum_encoder):
    entries = [(f"t{f}.wav", f"tone number {i}", None, f) for i, f in enumerate([400, 3000, 420, 3100, 6000])]
    m = small_manifest(tmp_path, entries)
    cfg = cfg_for("audio_encoder=spectrum", "database.neighbour_modality=audio->audio", "database.key=audio")
    build_database([m], tmp_path / "db", cfg, progress=False)
    db = Database.open(tmp_path / "db")
    assert db.key == "audio" and db.embeddings("audio").shape == (5, 384)
    nb = db.neighbours
    assert nb.modality == "audio->audio" and nb.ids[0, 0] == 2 and nb.ids[1, 0] == 3  # nearest tone
    scores, ids = db.search(db.embeddings("audio")[4], 1)
    assert ids[0, 0] == 4  # the index holds audio embeddings
    cfg = cfg_for("audio_encoder=spectrum", "database.neighbour_modality=text->audio")
    build_database([m], tmp_path / "db2", cfg, progress=False)
    nb = Database.open(tmp_path / "db2").neighbours
    assert nb.modality == "text->audio" and all(i not in nb.ids[i] for i in range(5))


@pytest.mark.parametrize("override", ["database.neighbour_modality=audio->audio", "database.key=audio",
                                      "database.neighbour_modality=text->audio"])
def test_audio_modality_without_audio_encoder_is_an_error(tmp_path, override):
    with pytest.raises(ReaudioError, match="no audio_encoder is configured"):
        build_database([tmp_path / "m.csv"], tmp_path / "db", cfg_for(override), progress=False)


def test_open_errors(tmp_path):
    with pytest.raises(ReaudioError, match="no database at"):
        Database.open(tmp_path / "nothing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ReaudioError, match="not a reaudio database"):
        Database.open(tmp_path / "plain")
    (tmp_path / "plain" / "notes.txt").write_text("mine")
    with pytest.raises(ReaudioError, match="not empty and is not a reaudio database"):
        build_database([write_csv(tmp_path / "m.csv", "path,caption", [])], tmp_path / "plain", cfg_for(), False)


def test_write_manifest(tmp_path, capsys, shared_data):
    esc, clotho = shared_data / "esc50-fold4" / "metadata.csv", shared_data / "clotho-demo" / "captions.csv"
    out = tmp_path / "sub" / "manifest.csv"
    assert write_manifest([esc, clotho], out) == 407
    assert cli.main(["manifest", str(esc), str(clotho), "-o", str(tmp_path / "cli.csv")]) == 0
    assert "wrote 407 rows" in capsys.readouterr().out
    rows, skipped, n = read_manifest(out)
    assert n == 407 and not skipped and all(Path(r.path).exists() for r in rows)
    assert not Path(rows[0].file).is_absolute()
    assert rows[0].label == "hand_saw" and rows[-1].label is None


# -- kill -9 -----------------------------------------------------------------------------
def start_build(manifest: Path, out: Path, stage: str) -> subprocess.Popen:
    env = {**os.environ, PAUSE_ENV: stage, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "REAUDIO_PLUGINS": "minilm,torch-retriever", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "reaudio_core.cli", "index", "build", "--manifest", str(manifest),
                             "--out", str(out), "--quiet", "retriever=torch"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def kill_when_paused(proc: subprocess.Popen, stage: str) -> None:
    watchdog = threading.Timer(180, proc.kill)
    watchdog.start()
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if f"reaudio-db: paused at {stage}" in line:
                break
        else:
            raise AssertionError(f"the build never reached {stage}:\n{''.join(seen)}")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        assert proc.returncode == -signal.SIGKILL
    finally:
        watchdog.cancel()
        proc.stderr.close()
        proc.stdout.close()


@pytest.mark.slow  # kill -9 of three index builds in fresh processes
def test_kill_9_leaves_the_previous_state_or_nothing_that_opens(tmp_path, warm_minilm):
    first = small_manifest(tmp_path, CAPTIONS[:2], "first.csv")
    second = small_manifest(tmp_path, CAPTIONS, "second.csv")
    runs = {}
    runs[("fresh", "written")] = (tmp_path / "fresh", None)  # a first build, killed once fully written
    # a rebuild over a live database, killed while embedding and after its version dir was renamed into place
    for stage in ("batch", "renamed"):
        out = tmp_path / f"live-{stage}"
        build_database([first], out, cfg_for(), progress=False)
        runs[("live", stage)] = (out, Database.open(out).items)
    procs = {key: start_build(second, out, key[1]) for key, (out, _) in runs.items()}  # all at once
    for key, proc in procs.items():
        kill_when_paused(proc, key[1])
    for (kind, stage), (out, items) in runs.items():
        if kind == "fresh":
            with pytest.raises(ReaudioError, match="interrupted|not a reaudio database"):
                Database.open(out)
        else:
            db = Database.open(out)
            assert db.version == "v0001" and db.items == items and len(db.index) == 2
    # the next build cleans up after the killed one and succeeds
    for key in (("fresh", "written"), ("live", "renamed")):
        out = runs[key][0]
        assert any(p.name.startswith((".tmp-", "v0002")) for p in out.iterdir())
        build_database([second], out, cfg_for(), progress=False)
        db = Database.open(out)
        assert len(db) == 4
        assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]
        if key[0] == "live":
            # the never-live v0002 of the killed build was removed, its name reused
            assert db.version == "v0002" and sorted(p.name for p in out.glob("v*")) == ["v0001", "v0002"]
            assert db.meta["previous"] == "v0001" and len(db.index) == 4


# -- real data -----------------------------------------------------------------------------
def test_real_esc50_and_clotho_dog_barking(tmp_path, capsys, shared_data, warm_minilm):
    """All 400 ESC-50 fold-4 clips + 7 Clotho clips, the offline default; "dog barking" -> dog clips."""
    esc, clotho = shared_data / "esc50-fold4" / "metadata.csv", shared_data / "clotho-demo" / "captions.csv"
    overrides = [] if "faiss" in get_registry().names("retriever") else ["retriever=torch"]
    assert cli.main(["index", "build", "--manifest", str(esc), "--manifest", str(clotho), "--out",
                     str(tmp_path / "db"), "--quiet", *overrides]) == 0
    assert "+407 items" in capsys.readouterr().out
    assert cli.main(["retrieve", "--db", str(tmp_path / "db"), "dog barking", "-k", "5", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["neighbours"]
    assert len(hits) == 5 and all(h["label"] == "dog" for h in hits)
    db = Database.open(tmp_path / "db")
    assert len(db) == 407 and db.retrieve("church bells", 1)[0]["label"] == "church_bells"
    clotho_item = next(it for it in db.items if it["file"].startswith("audio/01_barreau"))
    assert clotho_item["caption"] == "A ding sound against a bell occurs at different pitches."
    assert clotho_item["duration"] > 10
