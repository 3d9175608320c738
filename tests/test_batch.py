"""Batch runs (``reaudio generate --prompts FILE -o DIR``): the prompts file, resuming, the manifest of outputs."""
import csv

import numpy as np
import pytest
import soundfile as sf

from reaudio_core import cli
from reaudio_core.batch import read_prompts_file
from reaudio_core.config import compose
from reaudio_core.database import Database, build_database
from reaudio_core.evaluation import read_prompts
from reaudio_core.registry import ReaudioError


class Spy:
    """The tiny pipeline, counting the prompts it is asked to generate."""

    def __init__(self, pipe):
        self.pipe, self.cfg, self.asked = pipe, pipe.cfg, []

    def __call__(self, prompts, **kw):
        self.asked += prompts
        return self.pipe(prompts, **kw)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


@pytest.fixture
def spy(tiny_pipeline, monkeypatch):
    spy = Spy(tiny_pipeline)
    monkeypatch.setattr("reaudio_core.generate.load_pipeline", lambda args, overrides: spy)
    return spy


def run(prompts_file, out, *extra):
    return cli.main(["generate", "--prompts", str(prompts_file), "-o", str(out), "--quiet", *extra])


def manifest(out):
    with (out / "manifest.csv").open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_text_lines_skip_blanks_and_comments_and_names_are_unique(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# my prompts\n\na dog barks\n  rain / on a roof?  \nA dog barks\n\n#x\n", encoding="utf-8")
    jobs = read_prompts_file(f)
    assert [j.prompt for j in jobs] == ["a dog barks", "rain / on a roof?", "A dog barks"]
    assert [j.name for j in jobs] == ["a-dog-barks", "rain-on-a-roof", "a-dog-barks-2"]
    assert [j.line for j in jobs] == [3, 4, 5] and all(j.seed is None for j in jobs)


def test_csv_columns_and_its_errors(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("name,prompt,seed,label\n../etc/My Dog!,a dog barks,7,dog\n,a dog barks,,dog\nx,,3,\n"
                 "../etc/My Dog!,bells,1,\n", encoding="utf-8")
    jobs = read_prompts_file(f)
    assert [(j.prompt, j.seed, j.name, j.label) for j in jobs] == [
        ("a dog barks", 7, "etc-my-dog", "dog"), ("a dog barks", None, "a-dog-barks", "dog"),
        ("bells", 1, "etc-my-dog-2", "")]
    f.write_text("prompt,seed\na dog,seven\n", encoding="utf-8")
    with pytest.raises(ReaudioError, match=r"line 2: seed must be a whole number"):
        read_prompts_file(f)
    f.write_text("text2,seed\na dog,1\n", encoding="utf-8")
    with pytest.raises(ReaudioError, match="no prompt column"):
        read_prompts_file(f)
    (tmp_path / "p.txt").write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(ReaudioError, match="holds no prompt"):
        read_prompts_file(tmp_path / "p.txt")


def test_batch_writes_every_prompt_then_resumes(spy, tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("prompt,seed,name\na dog barks,1,dog\na dog barks,2,\na dog barks,1,again\nchurch bells,,\n")
    out = tmp_path / "out"
    assert run(f, out) == 0
    names = ["dog.wav", "a-dog-barks.wav", "again.wav", "church-bells.wav"]
    assert sorted(p.name for p in out.glob("*.wav")) == sorted(names)
    rows = manifest(out)
    assert [r["path"] for r in rows] == names and [r["seed"] for r in rows] == ["1", "2", "1", "0"]
    assert rows[0]["neighbours"].split(" | ")[0] == "a dog barking" and rows[3]["neighbours"].startswith("church")
    assert rows[0]["neighbour_ids"].split()[0] == "0"
    audio = {n: sf.read(out / n)[0] for n in names}
    assert np.array_equal(audio["dog.wav"], audio["again.wav"])  # same prompt, same seed
    assert not np.array_equal(audio["dog.wav"], audio["a-dog-barks.wav"])  # another seed
    assert len(spy.asked) == 4
    # resume: the existing outputs are kept untouched, the missing one is made, the manifest lists all
    stamps = {n: (out / n).stat().st_mtime_ns for n in names}
    (out / "again.wav").unlink()
    assert run(f, out) == 0
    assert spy.asked[4:] == ["a dog barks"]
    assert all((out / n).stat().st_mtime_ns == stamps[n] for n in names if n != "again.wav")
    assert np.array_equal(sf.read(out / "again.wav")[0], audio["dog.wav"])
    assert [r["path"] for r in manifest(out)] == names and manifest(out)[0] == rows[0]
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporary file behind
    # a run killed between a WAV and its manifest row: the WAV is kept, its row rebuilt with the neighbours
    (out / "manifest.csv").unlink()
    assert run(f, out) == 0 and len(spy.asked) == 5
    assert manifest(out) == rows


def test_a_changed_row_is_remade_and_another_configuration_refused(spy, tmp_path, capsys):
    f, out = tmp_path / "p.txt", tmp_path / "out"
    f.write_text("rain\n")
    assert run(f, out) == 0
    f.write_text("prompt,seed,name\nchurch bells,5,rain\n")
    f.rename(f.with_suffix(".csv"))
    assert run(f.with_suffix(".csv"), out) == 0 and spy.asked == ["rain", "church bells"]
    assert manifest(out)[0]["caption"] == "church bells" and manifest(out)[0]["seed"] == "5"
    cfg = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(cfg.replace("steps: 4", "steps: 9"))
    assert run(f.with_suffix(".csv"), out) == 2
    assert "another configuration (generation.steps: 9 -> 4)" in capsys.readouterr().err


def test_the_manifest_builds_a_database_and_is_a_prompts_csv(spy, tmp_path):
    f, out = tmp_path / "p.txt", tmp_path / "out"
    f.write_text("a dog barks\nrain on a roof\n")
    assert run(f, out) == 0
    report = build_database([out / "manifest.csv"], tmp_path / "db", compose("tiny"), progress=False)
    assert not report.skipped
    db = Database.open(tmp_path / "db")
    assert [it["caption"] for it in db.items] == ["a dog barks", "rain on a roof"]
    assert read_prompts(out / "manifest.csv") == {"a-dog-barks": "a dog barks", "rain-on-a-roof": "rain on a roof"}


def test_bad_batch_commands_are_one_line(tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("rain\n")
    assert cli.main(["generate", "dogs", "--prompts", str(f), "-o", str(tmp_path / "o")]) == 2
    assert "either as words or in --prompts FILE" in capsys.readouterr().err
    assert run(f, tmp_path / "x.wav") == 2
    assert "-o must be a folder" in capsys.readouterr().err
    assert run(tmp_path / "missing.txt", tmp_path / "o") == 2
    assert "missing.txt: not found" in capsys.readouterr().err


def test_the_cli_loads_the_model_once_for_a_batch(tiny_pipeline, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a dog barks\nbells\n")
    db = tiny_pipeline.database.root
    assert run(f, tmp_path / "out", "--preset", "tiny", "--db", str(db), "--steps", "2") == 0
    assert [r["caption"] for r in manifest(tmp_path / "out")] == ["a dog barks", "bells"]
