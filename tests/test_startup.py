"""Start-up (issue 23, item 3): `reaudio --help` imports no torch, `reaudio plugins` no model library; plugin
dependencies are imported where used; the stage timer of `reaudio generate --timings`; one model per set of
weights for the prompt and caption encoders."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from reaudio_core import ReaudioError, timings
from reaudio_core.optional import LazyModule, lazy

#: model libraries that listing plugins must not import (each costs a second or more of start-up)
HEAVY = ("diffusers", "transformers", "timm", "open_clip", "faiss", "hnswlib", "torchaudio", "scipy", "matplotlib",
         "sklearn", "laion_clap", "tqdm.auto", "ipywidgets")

PROBE = """
import contextlib, io, json, sys
import reaudio_core.cli as cli
out = {}
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    cli.main(["--help"])
out["help"] = sorted(sys.modules)
with contextlib.redirect_stdout(io.StringIO()) as listing:
    rc = cli.main(["plugins"])
out["plugins"] = sorted(sys.modules)
out["rc"], out["listing"] = rc, listing.getvalue()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def probe():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def _loaded(modules, names):
    return [n for n in names if any(m == n or m.startswith(n + ".") for m in modules)]


def test_help_imports_no_torch_nor_numpy(probe):
    assert _loaded(probe["help"], ("torch", "numpy", *HEAVY)) == []


def test_plugins_lists_every_plugin_without_importing_model_libraries(probe):
    assert probe["rc"] == 0
    assert "faiss " in probe["listing"] and "unet-ldm" in probe["listing"] and "failed" not in probe["listing"]
    assert _loaded(probe["plugins"], HEAVY) == []


def test_lazy_module_imports_on_first_use(monkeypatch):
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    mod = lazy("colorsys", None, "a feature")
    assert isinstance(mod, LazyModule) and "colorsys" not in sys.modules
    assert mod.rgb_to_hsv(1.0, 0.0, 0.0) == (0.0, 1.0, 1.0)
    assert "colorsys" in sys.modules


def test_lazy_module_that_is_missing_is_one_line_at_once():
    with pytest.raises(ReaudioError) as err:
        lazy("no_such_module_xyz", "laion", "the thing")
    assert str(err.value) == ("the thing needs no_such_module_xyz (No module named 'no_such_module_xyz'): "
                              'pip install "reaudio[laion]"')


def test_timings_book_each_stage_since_the_previous_mark(monkeypatch):
    monkeypatch.setattr(timings, "_stages", {})
    monkeypatch.setattr(timings, "_last", None)
    timings.mark("start")
    time.sleep(0.02)
    timings.mark("build")
    timings.mark("denoise")
    timings.mark("build")  # a stage marked again adds up
    got = timings.stages()
    assert list(got) == ["start", "build", "denoise"]
    assert got["start"] > 0  # the process's age: it started before this test
    assert got["build"] >= 0.02
    text = timings.table()
    assert text.splitlines()[0].startswith("stage") and text.splitlines()[-1].startswith("total")
    assert len(text.splitlines()) == 5
    monkeypatch.setattr(timings, "_begun", True)
    timings.begin()  # a second command in one process starts afresh, at 0
    assert timings.stages() == {"start": 0.0}


@pytest.mark.slow  # builds the tiny pipeline (about 5 s)
def test_generate_timings_prints_the_stage_table(monkeypatch, capsys, tmp_path):
    from reaudio_core.cli import main
    monkeypatch.setattr(timings, "_stages", {})
    monkeypatch.setattr(timings, "_last", None)
    monkeypatch.setattr(timings, "_begun", True)  # a later command of this process: its start is 0
    rc = main(["generate", "a dog barks", "--preset", "tiny", "--steps", "1", "--quiet", "--timings",
               "generation.retrieval=none", "-o", str(tmp_path / "x.wav")])
    assert rc == 0
    err = capsys.readouterr().err
    for stage in ("start", "build", "condition", "denoise", "decode", "vocode", "write", "total"):
        assert f"\n{stage} " in "\n" + err, err
    assert "\nstart         0.000 s" in "\n" + err


def test_prompt_and_caption_encoders_share_one_minilm():
    from reaudio_core import create
    a, b = create("text_encoder", "minilm"), create("text_encoder", "minilm")
    assert a.model is b.model and a.tokenizer is b.tokenizer


def test_startup_benchmark_reads_the_stage_table_and_importtime():
    from benchmarks.generation.startup import markdown, parse_importtime, parse_stages
    err = "noise\nstage      wall time\nstart         0.250 s\nbuild         3.500 s\ndenoise       2.000 s\n" \
          "total         5.750 s\n"
    assert parse_stages(err) == {"start": 0.25, "build": 3.5, "denoise": 2.0}
    imports = parse_importtime("import time: self [us] | cumulative | imported package\n"
                               "import time:       100 |        100 |     b.c\n"
                               "import time:       200 |        300 |   b\n"
                               "import time:        50 |        350 | a\n")
    assert [(r["name"], r["depth"], r["parent"]) for r in imports] == [("b.c", 2, "b"), ("b", 1, "a"), ("a", 0, None)]
    assert imports[2]["cumulative_s"] == pytest.approx(350e-6) and imports[1]["self_s"] == pytest.approx(200e-6)
    text = markdown({"repeats": 1, "threads": 2, "command": "c", "load_average": [[1, 1, 1], [1, 1, 1]], "cores": 2,
                     "stages_median_s": {"start": 0.25}, "wall_median_s": 4.0, "overhead_median_s": 2.0,
                     "target_overhead_s": 3.0, "import_total_s": 1.0, "imports_top": [imports[2]],
                     "imports_nested_top": [imports[1]], "wall_s": [4.0]})
    assert "**2.00** (target <= 3: met)" in text and "| b | a | 0.00 |" in text
