"""Boundaries of the command line: every bad input or unwritable output is one line on stderr (exit 2), never a
traceback, and inputs that used to be accepted silently (a 5 ms clip, a silent training clip, an untrained
encoder embedding a database) are refused, skipped or warned about. Driven through ``reaudio_core.cli.main``
on the ``tiny`` preset and tiny temporary databases."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from conftest import make_clip
from reaudio_core import ReaudioError
from reaudio_core.cli import main

TINY_GEN = ["--preset", "tiny", "--quiet", "generation.retrieval=none"]


def error_line(capsys, rc: int) -> str:
    """The single ``reaudio: error:`` line of a failed command (``reaudio: warning:`` lines aside)."""
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("reaudio: warning:")]
    assert len(lines) == 1 and lines[0].startswith("reaudio: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """Two tones, a silent clip and a 5 ms clip, with manifests: good.csv (the tones), mixed.csv (all four),
    missing.csv (only files that do not exist)."""
    root = tmp_path_factory.mktemp("clips")
    make_clip(root / "a.wav", freq=330.0, seed=1)
    make_clip(root / "b.wav", freq=550.0, seed=2)
    sf.write(root / "silent.wav", np.zeros(16000, np.float32), 16000)
    make_clip(root / "short.wav", seconds=0.005, seed=3)
    (root / "good.csv").write_text("path,caption,label\na.wav,a low tone,tone\nb.wav,a high tone,tone\n")
    (root / "mixed.csv").write_text("path,caption,label\na.wav,a low tone,tone\nb.wav,a high tone,tone\n"
                                    "silent.wav,nothing at all,quiet\nshort.wav,a click,click\n")
    (root / "missing.csv").write_text("path,caption,label\ngone1.wav,a tone,tone\ngone2.wav,a tone,tone\n")
    return root


DB_ARGS = ["--preset", "tiny", "--quiet", "retriever=torch", "database.embed_audio=false"]


@pytest.fixture(scope="module")
def built_db(clips, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("db") / "db"
    assert main(["index", "build", "--manifest", str(clips / "good.csv"), "--out", str(out), *DB_ARGS]) == 0
    return out


@pytest.fixture
def db_copy(built_db, tmp_path) -> Path:
    return Path(shutil.copytree(built_db, tmp_path / "db"))


# -- generate: numbers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, key", [
    (["--guidance", "nan"], "guidance"), (["--guidance", "inf"], "guidance"), (["--guidance", "-1"], "guidance"),
    (["generation.guidance=.nan"], "guidance"), (["generation.guidance=loud"], "guidance"),
    (["--steps", "0"], "steps"), (["--steps", "100000"], "steps"),
    (["--duration", "nan"], "duration"), (["--duration", "-2"], "duration"),
    (["--candidates", "100000"], "candidates"), (["--seed", "-1"], "seed"),
    (["--seed", "99999999999999999999"], "seed"),
])
def test_generate_numbers_must_be_finite_and_in_range(tmp_path, capsys, args, key):
    out = tmp_path / "x.wav"
    line = error_line(capsys, main(["generate", "a dog", "-o", str(out), *TINY_GEN, *args]))
    assert f"--{key}" in line
    assert not out.exists()


def test_zero_guidance_is_accepted_as_the_unconditional_model(tmp_path, capsys):
    out = tmp_path / "x.wav"
    assert main(["generate", "a dog", "-o", str(out), *TINY_GEN, "--guidance", "0", "--steps", "1"]) == 0
    assert out.exists()


# -- generate: prompts with '=' ----------------------------------------------------------------------------------
def test_prompt_with_equals_sign_via_flag_and_after_dashes(tmp_path, capsys):
    args = [*TINY_GEN, "--steps", "1"]
    assert main(["generate", "--prompt", "a=b dog", "-o", str(tmp_path / "flag.wav"), *args]) == 0
    assert "<- 'a=b dog'" in capsys.readouterr().out
    assert main(["generate", "-o", str(tmp_path / "dash.wav"), *args, "--", "a=b dog"]) == 0
    assert "<- 'a=b dog'" in capsys.readouterr().out
    # after --, an option-like or key=value word is a prompt too; before it, positional words keep their meaning
    assert main(["generate", "a dog", "-o", str(tmp_path / "d"), *args, "--", "x.y=z", "--seed"]) == 0
    printed = capsys.readouterr().out
    assert "<- 'a dog'" in printed and "<- 'x.y=z'" in printed and "<- '--seed'" in printed
    # unchanged: a positional key=value word is an override, so this command has no prompt, and says how to give one
    line = error_line(capsys, main(["generate", "a=b dog", "-o", str(tmp_path / "none.wav"), *args]))
    assert "no prompt given" in line and "--prompt" in line


# -- unwritable outputs ------------------------------------------------------------------------------------------
def test_unwritable_outputs_fail_before_any_work(tmp_path, clips, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("a file, not a folder")
    import reaudio_core.pipeline as pipeline
    monkeypatch.setattr(pipeline.ReAudioPipeline, "from_config", lambda *a, **k: pytest.fail("built a model"))
    line = error_line(capsys, main(["generate", "a dog", "-o", str(afile / "x.wav"), *TINY_GEN]))
    assert str(afile) in line and "not a folder" in line
    line = error_line(capsys, main(["generate", "a dog", "-o", str(afile), *TINY_GEN]))  # a folder output
    assert str(afile) in line

    import reaudio_core.database.build as database_build
    monkeypatch.setattr(database_build, "_embed_rows", lambda *a, **k: pytest.fail("embedded"))
    line = error_line(capsys, main(["index", "build", "--manifest", str(clips / "good.csv"),
                                    "--out", str(afile / "db"), *DB_ARGS]))
    assert str(afile) in line

    cfg = tmp_path / "vae.yaml"
    cfg.write_text(yaml.safe_dump(vae_training(clips / "good.csv")))
    import reaudio_core.training as training
    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("trained"))
    line = error_line(capsys, main(["train", "--config", str(cfg), "--out", str(afile / "run"), "--quiet"]))
    assert str(afile) in line
    line = error_line(capsys, main(["manifest", str(clips / "good.csv"), "-o", str(afile / "m.csv")]))
    assert str(afile) in line


def test_unwritable_database_folder_for_index_add(db_copy, clips, capsys, monkeypatch):
    """Root ignores permission bits, so the read-only folder is simulated at os.access."""
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == db_copy.absolute() else real(p, mode))
    line = error_line(capsys, main(["index", "add", "--db", str(db_copy), "--manifest", str(clips / "mixed.csv"),
                                    "--quiet"]))
    assert str(db_copy) in line and "not writable" in line


def test_an_os_error_during_a_command_is_one_line_naming_the_path(tmp_path, clips, capsys, monkeypatch):
    import reaudio_core.database as database

    def fail(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "db" / "v0001"))
    monkeypatch.setattr(database, "build_database", fail)
    line = error_line(capsys, main(["index", "build", "--manifest", str(clips / "good.csv"),
                                    "--out", str(tmp_path / "db"), *DB_ARGS]))
    assert line == f"reaudio: error: {tmp_path / 'db' / 'v0001'}: Permission denied [EACCES]"


# -- failed builds -----------------------------------------------------------------------------------------------
def test_a_failed_build_leaves_nothing_behind(tmp_path, clips, capsys):
    out = tmp_path / "new" / "db"
    line = error_line(capsys, main(["index", "build", "--manifest", str(clips / "missing.csv"), "--out", str(out),
                                    *DB_ARGS]))
    assert "no usable items" in line
    assert not (tmp_path / "new").exists()
    empty = tmp_path / "empty"  # a folder that existed stays, without the lock file
    empty.mkdir()
    assert main(["index", "build", "--manifest", str(clips / "missing.csv"), "--out", str(empty), *DB_ARGS]) == 2
    assert empty.is_dir() and not list(empty.iterdir())


def test_a_failure_while_writing_removes_the_new_folder_but_never_a_live_database(tmp_path, clips, db_copy, capsys,
                                                                                   monkeypatch):
    import reaudio_core.database as database

    def broken(*a, **k):
        raise OSError(28, "No space left on device", "somewhere")
    monkeypatch.setattr(database.build, "_write_version", broken)
    out = tmp_path / "fresh"
    error_line(capsys, main(["index", "build", "--manifest", str(clips / "good.csv"), "--out", str(out), *DB_ARGS]))
    assert not out.exists()
    before = sorted(p.name for p in db_copy.iterdir())
    error_line(capsys, main(["index", "build", "--manifest", str(clips / "good.csv"), "--out", str(db_copy),
                             *DB_ARGS]))
    assert sorted(p.name for p in db_copy.iterdir()) == before
    assert len(database.Database.open(db_copy)) == 2


# -- damaged database and model folders ---------------------------------------------------------------------------
@pytest.mark.parametrize("name, text", [("meta.json", "garbage {"), ("meta.json", "[1, 2]"),
                                        ("config.yaml", "{{{ not yaml"), ("config.yaml", "just: [a, mapping]"),
                                        ("items.jsonl", "{\"id\": 0}\nnot json\n")])
def test_a_damaged_database_file_is_named_with_what_to_do(db_copy, capsys, name, text):
    version = (db_copy / "CURRENT").read_text().strip()
    (db_copy / version / name).write_text(text)
    line = error_line(capsys, main(["retrieve", "--db", str(db_copy), "a tone"]))
    assert name in line and "reaudio index build" in line


def test_a_damaged_model_folder_config_is_named(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    for text in ("{{{ not yaml", "foo: 1", "text_encoder: minilm", "\udcff"):
        (model / "config.yaml").write_bytes(text.encode("utf-8", "surrogateescape"))
        line = error_line(capsys, main(["generate", "a dog", "-o", str(tmp_path / "x.wav"), "--model", str(model)]))
        assert str(model / "config.yaml") in line


def test_component_json_and_weights_errors_name_the_file(tmp_path):
    from reaudio_plugins._ckpt import read_json, read_weights
    bad = tmp_path / "config.json"
    for text in ("{oops", "[1, 2]"):
        bad.write_text(text)
        with pytest.raises(ReaudioError, match=r"config\.json.*re-save"):
            read_json(bad)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ReaudioError, match=r"model\.safetensors.*re-save"):
        read_weights(tmp_path / "model.safetensors")


def test_a_delta_file_reads_back_as_its_base_plus_the_4bit_difference(tmp_path):
    """write_delta (the offline-fast student against its teacher): read_weights returns float32 weights within
    half a quantisation step of each group of the difference; what the base lacks is kept in half precision;
    a changed or missing base file is refused by name."""
    from safetensors.torch import save_file

    from reaudio_plugins._ckpt import DELTA_SCALE, GROUP, read_weights, write_delta
    g = torch.Generator().manual_seed(0)
    base = {"conv.weight": torch.randn(32, 16, 3, 3, generator=g).half(), "norm.weight": torch.randn(100, generator=g)}
    save_file(base, tmp_path / "base.safetensors")
    state = {"conv.weight": base["conv.weight"].float() + 0.03 * torch.randn(32, 16, 3, 3, generator=g),
             "norm.weight": base["norm.weight"] + 0.01, "new.weight": torch.randn(8, 4, generator=g),
             "step": torch.tensor(3)}
    (tmp_path / "student").mkdir()
    write_delta(tmp_path / "student" / "model.safetensors", state, tmp_path / "base.safetensors")
    back = read_weights(tmp_path / "student" / "model.safetensors")
    assert back.keys() == state.keys() and back["conv.weight"].dtype == torch.float32
    assert torch.equal(back["new.weight"], state["new.weight"].half().float()) and back["step"] == 3
    for k in ("conv.weight", "norm.weight"):
        d = (state[k] - base[k].float()).reshape(-1)
        d = torch.cat([d, d.new_zeros(-len(d) % GROUP)]).view(-1, GROUP)
        step = d.abs().amax(1, keepdim=True) / 7
        err = (back[k] - state[k]).reshape(-1)
        err = torch.cat([err, err.new_zeros(-len(err) % GROUP)]).view(-1, GROUP)
        assert (err.abs() <= 0.51 * step + 1e-6).all() and err.abs().max() > 0, k  # lossy, within half a step
    from safetensors.torch import load_file
    raw = load_file(tmp_path / "student" / "model.safetensors")
    assert raw["conv.weight"].dtype == torch.uint8 and raw["conv.weight"].numel() == 32 * 16 * 9 // 2  # 4 bits
    import shutil
    shutil.copy(tmp_path / "student" / "model.safetensors", tmp_path / "moved.safetensors")
    with pytest.raises(ReaudioError, match="not there"):
        read_weights(tmp_path / "moved.safetensors")
    save_file({k: v + 1 for k, v in base.items()}, tmp_path / "base.safetensors")
    with pytest.raises(ReaudioError, match="has changed since"):
        read_weights(tmp_path / "student" / "model.safetensors")
    assert DELTA_SCALE == ".int4_scale"


# -- inputs that are not what they should be ------------------------------------------------------------------------
def test_unknown_preset_missing_manifest_and_folders_given_for_files(tmp_path, clips, capsys):
    out = str(tmp_path / "db")
    line = error_line(capsys, main(["index", "build", "--manifest", str(clips / "good.csv"), "--out", out,
                                    "--preset", "tinny"]))
    assert "Unknown preset 'tinny'" in line and "tiny" in line
    line = error_line(capsys, main(["index", "build", "--manifest", str(tmp_path / "nope.csv"), "--out", out]))
    assert "manifest not found" in line
    line = error_line(capsys, main(["index", "build", "--manifest", str(clips), "--out", out]))
    assert "is a folder" in line
    line = error_line(capsys, main(["index", "build", "--manifest", str(clips / "good.csv"), "--out", out,
                                    "--config", str(clips)]))
    assert "is a folder" in line
    line = error_line(capsys, main(["generate", "a dog", "-o", str(tmp_path / "x.wav"), "--preset", "nope"]))
    assert "Unknown preset 'nope'" in line
    assert not Path(out).exists()
    line = error_line(capsys, main(["retrieve", "--db", str(clips / "good.csv"), "a tone"]))
    assert "is a file" in line
    line = error_line(capsys, main(["evaluate", "--generated", str(clips / "a.wav"), "--reference", str(clips)]))
    assert "is a file" in line
    line = error_line(capsys, main(["evaluate", "--generated", str(clips), "--reference", str(clips),
                                    "--prompts", str(clips)]))
    assert "is a folder" in line


# -- short and silent clips ------------------------------------------------------------------------------------------
def vae_training(manifest: Path) -> dict:
    return {"decoder": {"name": "vae", "params": {"block_out_channels": [8, 16, 16], "layers_per_block": 1,
                                                  "latent_channels": 8, "norm_num_groups": 4}},
            "training": {"stage": "vae", "manifest": [str(manifest)], "batch_size": 2, "lr": 1e-3, "warmup_steps": 1,
                         "max_steps": 1, "checkpoint_every": 1, "log_every": 1, "crop_seconds": 0.32,
                         "ema_decay": 0, "threads": 1}}


def test_training_skips_silent_and_short_clips_as_index_build_does(tmp_path, clips, capsys):
    from reaudio_core.database import Database
    cfg = tmp_path / "vae.yaml"
    cfg.write_text(yaml.safe_dump(vae_training(clips / "mixed.csv")))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    import csv
    trained = {Path(r["path"]).name: r["reason"]
               for r in csv.DictReader((tmp_path / "run" / "skipped.csv").open(encoding="utf-8"))}
    assert main(["index", "build", "--manifest", str(clips / "mixed.csv"), "--out", str(tmp_path / "db"),
                 *DB_ARGS]) == 0
    built = {Path(s["path"]).name: s["reason"] for s in Database.open(tmp_path / "db").report()["skipped"]}
    assert set(trained) == set(built) == {"silent.wav", "short.wav"}
    assert trained == built and trained["silent.wav"].startswith("silent")


def test_evaluate_excludes_a_5ms_clip_with_a_warning(tmp_path, clips, capsys):
    gen, ref = tmp_path / "gen", tmp_path / "ref"
    for i in range(3):
        make_clip(gen / f"c{i}.wav", freq=300.0 + 100 * i, seed=i)
        make_clip(ref / f"c{i}.wav", freq=320.0 + 100 * i, seed=10 + i)
    shutil.copy(clips / "short.wav", gen / "tiny.wav")
    assert main(["evaluate", "--generated", str(gen), "--reference", str(ref), "--json", "--quiet",
                 "--no-cache"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["set_size"]["generated"] == 3
    assert [Path(e["file"]).name for e in out["excluded"]] == ["tiny.wav"]
    assert "too short: 0.005 s < 0.1 s" in out["excluded"][0]["reason"]
    assert any("tiny.wav" in w and "excluded" in w for w in out["warnings"])
    assert all(Path(i["file"]).name != "tiny.wav" for i in out["items"])


# -- the offline preset's audio encoder ----------------------------------------------------------------------
def test_offline_preset_audio_encoder_is_the_shipped_trained_one():
    from reaudio_core.config import build, compose
    from reaudio_core.pipeline import resolve_path
    from reaudio_plugins.vae_latent import VaeLatentEncoder
    enc = build(compose("offline"), "audio_encoder")
    shipped = VaeLatentEncoder.from_pretrained(resolve_path("pkg:reaudio_plugins/weights/offline/audio_encoder"))
    assert not enc.untrained
    mine, theirs = enc.vae.model.state_dict(), shipped.vae.model.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine if k.startswith(("encoder.", "quant_conv.")))
    wav = [np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1]
    assert torch.equal(enc.embed(wav), shipped.embed(wav))


def test_an_untrained_audio_encoder_never_embeds_a_database(tmp_path, clips, capsys):
    out = tmp_path / "db"
    with pytest.warns(UserWarning, match="untrained"):
        from reaudio_core.registry import create
        assert create("audio_encoder", "vae-latent", weights=None).untrained
    line = error_line(capsys, main(["index", "build", "--manifest", str(clips / "good.csv"), "--out", str(out),
                                    "--quiet", "database.neighbour_modality=audio->audio",
                                    "audio_encoder.params.weights=null"]))
    assert "no trained weights" in line and "audio_encoder.params.weights" in line
    assert not out.exists()


def test_an_output_on_a_file_system_that_takes_no_files_is_one_line(capsys):
    """Root passes every permission check; /proc still takes no new files: refused before any work."""
    from reaudio_core.cli import main
    assert main(["generate", "a dog", "-o", "/proc/reaudio-test.wav", "--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("reaudio: error: cannot write -o /proc/reaudio-test.wav") and "\n" not in err


def test_wav_is_written_atomically(tmp_path, monkeypatch):
    """A write that fails half-way leaves the previous file, not a truncated WAV."""
    import soundfile as sf

    from reaudio_core.audio import save_wav
    out = tmp_path / "x.wav"
    save_wav(out, np.zeros(160, np.float32))
    before = out.read_bytes()

    def broken(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(sf, "write", broken)
    with pytest.raises(OSError):
        save_wav(out, np.ones(320, np.float32) * 0.5)
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["x.wav"]
