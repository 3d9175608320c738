"""`reaudio experiment` and the long-tail report (reaudio_core/experiment/, reaudio_core/longtail.py).

The end-to-end test runs a micro grid (4 synthetic classes of 2 clips, MiniLM, tiny VAE / UNet,
Griffin-Lim, 3 training steps, 0.32 s clips) through training, generation, evaluation and reporting,
then checks that a rerun skips every finished cell and that a lost clip is regenerated alone.
"""
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, make_clip
from reaudio_core import ReaudioError
from reaudio_core import longtail as L
from reaudio_core.cli import main

TINY_VAE = {"block_out_channels": [8, 16, 16], "layers_per_block": 1, "latent_channels": 8, "norm_num_groups": 4}
CLASSES = {"dog": "a dog barks", "rain": "rain falls on a roof", "church_bells": "church bells ring",
           "hand_saw": "a saw cuts wood"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- long-tail building blocks ---------------------------------------------------------------------------
def test_buckets_names_and_assignment():
    b = L.Buckets((0, 1, 11, 101, 1001))
    assert b.names == ["0", "1-10", "11-100", "101-1000", ">=1001"]
    assert [b.name(c) for c in (0, 1, 10, 11, 500, 5000)] == ["0", "1-10", "1-10", "11-100", "101-1000", ">=1001"]
    small = L.Buckets((0, 1, 2, 4, 8))
    assert small.names == ["0", "1", "2-3", "4-7", ">=8"]
    with pytest.raises(ReaudioError, match="start at 0"):
        L.Buckets((1, 2))
    with pytest.raises(ReaudioError, match="increase strictly"):
        L.Buckets((0, 4, 4))


def test_counts_and_bucket_scores():
    counts = L.count_labels([["dog"], ["dog", "dog"], "rain", None, [], ["dog", "cat"]])
    assert counts == {"dog": 3, "rain": 1, "cat": 1}  # a label repeated inside one clip counts once
    b = L.Buckets((0, 1, 2))
    items = [{"labels": ["dog"], "kl": 1.0, "hit": 1.0},
             {"labels": ["dog"], "kl": 3.0, "hit": 0.0},
             {"labels": ["rain"], "kl": 2.0},                 # no hit score: left out of that mean only
             {"labels": ["owl"], "kl": 5.0, "hit": 0.0},      # never in training: bucket 0
             {"labels": ["dog", "owl"], "kl": 7.0},           # rarest label decides (min)
             {"labels": [], "kl": 9.0}]                       # unlabelled: counted apart
    r = L.bucket_scores(items, counts, b, ["kl", "hit"])
    assert r["unlabelled"] == 1
    assert r["buckets"][">=2"]["kl"] == {"mean": 2.0, "n": 2} and r["buckets"][">=2"]["hit"]["mean"] == 0.5
    assert r["buckets"]["1"]["kl"] == {"mean": 2.0, "n": 1} and r["buckets"]["1"]["hit"] == {"mean": None, "n": 0}
    assert r["buckets"]["0"]["kl"] == {"mean": 6.0, "n": 2} and r["buckets"]["0"]["labels"] == ["owl"]
    each = L.bucket_scores(items, counts, b, ["kl"], multi_label="each")
    assert each["buckets"][">=2"]["kl"]["n"] == 3 and each["buckets"]["0"]["kl"]["n"] == 2
    md = L.report_markdown(counts, b, {"m": r}, ["kl", "hit"])
    assert "| m | 6.000 (n=2) | 2.000 (n=1) | 2.000 (n=2) |" in md and "lower is better" in md


def test_audioset_matcher_whole_words_synonyms_and_plurals(tmp_path):
    onto = [{"id": "a", "name": "Dog", "restrictions": []},
            {"id": "b", "name": "Male speech, man speaking", "restrictions": []},
            {"id": "c", "name": "Car alarm", "restrictions": []},
            {"id": "d", "name": "Car", "restrictions": []},
            {"id": "e", "name": "Whimper (dog)", "restrictions": []},
            {"id": "f", "name": "Human sounds", "restrictions": ["abstract"]},
            {"id": "g", "name": "Bus", "restrictions": []}]
    (tmp_path / "ontology.json").write_text(json.dumps(onto))
    m = L.AudioSetMatcher.from_dir(tmp_path)
    assert "Human sounds" not in m.names and "whole words, case-insensitive" in m.description
    assert m.labels("Two DOGS bark while a man speaking nearby; a car alarm sounds") == \
        ["Dog", "Male speech, man speaking", "Car alarm", "Car"]
    assert m.labels("a dogma of carpets") == []             # word boundaries: no substring matches
    assert m.labels("buses pass, a puppy whimpers") == ["Whimper (dog)", "Bus"]
    assert m.labels("human sounds") == []                  # abstract grouping classes are left out
    manifest = tmp_path / "caps.csv"
    manifest.write_text("file,caption\na.wav,A dog barks\nb.wav,Dogs and a car\nc.wav,silence\n")
    counts = L.count_labels(L.labels_from_manifest(manifest, matcher=m))
    assert counts == {"Dog": 2, "Car": 1}


def test_audioset_matcher_on_the_real_ontology(shared_data):
    m = L.AudioSetMatcher.from_dir(shared_data / "audioset")
    assert len(m.names) > 500
    assert {"Dog", "Bark"} <= set(m.labels("A dog bark echoes"))
    labels = L.labels_from_manifest(shared_data / "esc50-fold4" / "metadata.csv")  # the category column
    assert len(labels) == 400 and L.count_labels(labels)["dog"] == 8


def test_plot_buckets_writes_a_png(tmp_path):
    b = L.Buckets((0, 1, 2))
    per = {"none": {"buckets": {"0": {"kl": {"mean": 2.0}}, "1": {"kl": {"mean": 1.5}}, ">=2": {"kl": {"mean": 1.0}}}},
           "audio+text": {"buckets": {"0": {"kl": {"mean": 1.2}}, "1": {"kl": {"mean": None}}, ">=2": {"kl": {"mean": 0.9}}}}}
    path = L.plot_buckets(tmp_path / "fig.png", per, "kl", b, title="t", spread={"none": {"0": 0.1}})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob(".*"))


# -- subset rules and config errors ------------------------------------------------------------------------
def test_long_tailed_subset_is_seeded_and_checked():
    from reaudio_core.experiment import select_subset
    items = [{"label": f"c{c}", "path": f"{c}-{i}", "file": f"{c}-{i}.wav"} for c in range(10) for i in range(8)]
    ids, counts = select_subset(items, {"per_label": [8, 4, 2, 1, 0], "seed": 0})
    assert sorted(counts.values()) == sorted([8, 4, 2, 1, 0] * 2) and len(ids) == 30
    assert all(sum(items[i]["label"] == lab for i in ids) == n for lab, n in counts.items())
    assert select_subset(items, {"per_label": [8, 4, 2, 1, 0], "seed": 0}) == (ids, counts)
    assert select_subset(items, {"per_label": [8, 4, 2, 1, 0], "seed": 1})[1] != counts
    only, c2 = select_subset(items, {"per_label": [2, 1], "labels": ["c3", "c4"], "seed": 0})
    assert sorted(n for n in c2.values() if n) == [1, 2] and sum(c2.values()) == 3 == len(only)
    assert select_subset(items, {"per_label": {"c0": 3}})[1]["c0"] == 3
    with pytest.raises(ReaudioError, match="has 8 clip"):
        select_subset(items, {"per_label": 9})
    with pytest.raises(ReaudioError, match="not labels"):
        select_subset(items, {"per_label": 1, "labels": ["nope"]})


def test_bad_experiment_files_say_what_is_wrong(tmp_path):
    from reaudio_core.experiment import build_plan, load_experiment
    f = tmp_path / "e.yaml"
    f.write_text("varaints: []\n")
    with pytest.raises(ReaudioError, match="Did you mean 'variants'"):
        load_experiment(f)
    f.write_text("variants: [{retrieval: [audio+txt]}]\ndata: {manifest: nothing.csv}\n")
    with pytest.raises(ReaudioError, match="not one of none, audio, text, audio\\+text"):
        build_plan(load_experiment(f, out=tmp_path / "o"))
    f.write_text("variants: [{retrieval: none, name: a}, {retrieval: audio, name: a}]\n")
    with pytest.raises(ReaudioError, match="more than once"):
        build_plan(load_experiment(f, out=tmp_path / "o"))
    with pytest.raises(ReaudioError, match="key=value"):
        load_experiment(f, ["seeds"])


# -- dry runs of the shipped configs ------------------------------------------------------------------------
@pytest.mark.parametrize("name,trainings,cells,prompts", [("esc50-offline", 13, 39, 50), ("esc50-small", 4, 21, 20),
                                                         ("esc50-ci", 3, 6, 10)])
def test_dry_run_of_the_esc50_configs(shared_data, capsys, monkeypatch, tmp_path, name, trainings, cells, prompts):
    monkeypatch.chdir(REPO)
    rc = main(["experiment", "--config", f"configs/experiments/{name}.yaml", "--dry-run", "--out", str(tmp_path / name)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"trainings: {trainings} (0 finished)" in out and f"generations: {cells} cells" in out
    assert f"prompts: {prompts}" in out and "nothing was computed" in out
    assert "classes unseen" in out and "0: " in out  # bucket 0 = classes never seen in training
    assert not (tmp_path / name).exists()           # a dry run writes nothing


def test_dry_run_of_audiocaps_lists_what_is_missing(shared_data, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    rc = main(["experiment", "--config", "configs/experiments/audiocaps-full.yaml", "--dry-run",
               "--out", str(tmp_path / "ac")])
    cap = capsys.readouterr()
    assert rc == 2 and "problem(s) listed above; nothing was computed" in cap.err
    out = cap.out
    assert "prompts: 975" in out and "variants (7)" in out
    assert "Labels derived from captions by matching AudioSet" in out  # says how labels were derived
    for piece in ("data.manifest", "reference.dir", "models/re-audioldm-s missing", "vggish", "panns-cnn14"):
        assert piece in out, piece
    if not torch.cuda.is_available():
        assert "CUDA GPU is required" in out


# -- the micro grid, end to end ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    rows = ["path,caption,label"]
    for c, (label, caption) in enumerate(CLASSES.items()):
        for j in range(2):
            make_clip(root / "clips" / f"{label}{j}.wav", seconds=0.5, freq=200 + 150 * c + 20 * j, seed=2 * c + j)
            rows.append(f"clips/{label}{j}.wav,{caption},{label}")
    (root / "m.csv").write_text("\n".join(rows) + "\n")
    from reaudio_core import create
    torch.manual_seed(0)
    create("decoder", "vae", **TINY_VAE, scale_factor=0.9).save_pretrained(root / "vae")
    base = {"text_encoder": "minilm", "caption_encoder": "minilm", "retriever": "torch",
            "audio_encoder": {"name": "vae-latent", "params": {"weights": str(root / "vae"), "num_tokens": 4}},
            "decoder": {"name": "vae", "params": {"checkpoint": str(root / "vae")}},
            "denoiser": {"name": "unet-ldm", "params": {"size": "tiny", "prompt_dim": 384, "text_dim": 384,
                                                        "audio_dim": 128}},
            "vocoder": {"name": "griffin-lim", "params": {"n_iter": 2}},
            "database": {"neighbours": 4},
            "generation": {"caption_tokens": 8, "duration": 0.32},
            "training": {"stage": "ldm", "batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "max_steps": 3,
                         "checkpoint_every": 2, "log_every": 1, "crop_seconds": 0.32, "ema_decay": 0.9, "threads": 1}}
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    exp = {"name": "micro", "base": [str(root / "base.yaml")], "data": {"manifest": str(root / "m.csv")},
           "subset": {"per_label": [2, 1, 0], "seed": 0}, "prompts": {"per_label": 1},
           "variants": [{"retrieval": ["none", "audio+text"], "k": [1, 2]}], "train_k": 2, "seeds": [0, 1],
           "generation": {"steps": 2}, "generate_batch": 4,
           "evaluation": {"features": "esc50-classifier", "clap": "off"},
           "longtail": {"buckets": [0, 1, 2]}, "threads": 1}
    (root / "exp.yaml").write_text(yaml.safe_dump(exp))
    cache = os.environ.get("REAUDIO_CACHE")
    os.environ["REAUDIO_CACHE"] = str(root / "cache")
    try:
        from reaudio_core.experiment import run_experiment
        first = run_experiment(root / "exp.yaml", out=root / "out", progress=False)
        second = run_experiment(root / "exp.yaml", out=root / "out", progress=False)
        yield root, first, second
    finally:
        if cache is None:
            os.environ.pop("REAUDIO_CACHE", None)
        else:
            os.environ["REAUDIO_CACHE"] = cache


@pytest.mark.slow  # the micro grid (`micro`): trainings and generations end to end
def test_micro_grid_writes_table_plots_and_results(micro):
    root, first, _ = micro
    out = root / "out"
    results = json.loads((out / "results.json").read_text())
    cells = {(c["variant"], c["seed"]) for c in results["cells"]}
    assert cells == {(v, s) for v in ("none", "audio+text-k1", "audio+text-k2") for s in (0, 1)}
    assert first["this_run"]["ran"] == {"prepare": 0, "train": 2, "generate": 6, "evaluate": 6}
    # train_k: 2 -> the k sweep shares one trained model per retrieval type
    models = {c["variant"]: c["model"] for c in results["cells"]}
    assert models["audio+text-k1"] == models["audio+text-k2"] != models["none"]
    train_cfg = yaml.safe_load((Path(models["audio+text-k1"]).parent / "config.yaml").read_text())
    assert train_cfg["training"]["include_ids"] == results["subset"]["ids"] and results["subset"]["items"] == 5
    assert train_cfg["generation"]["k"] == 2 and train_cfg["generation"]["retrieval"] == "audio+text"
    # one clip per prompt per cell, named after its reference clip (KL pairs)
    for v in ("none", "audio+text-k1", "audio+text-k2"):
        for s in (0, 1):
            assert sorted(p.stem for p in (out / "gen" / v / str(s)).glob("*.wav")) == \
                sorted(f"{c}0" for c in CLASSES)
    c0 = results["cells"][0]
    assert c0["metrics"]["fad"] is not None and c0["metrics"]["kl"] is not None and c0["metrics"]["top1"] is not None
    assert c0["set_size"]["pairs"] == 4 and "is" in c0["not_computed"] and "clap_score" in c0["not_computed"]
    assert set(c0["buckets"]["buckets"]) == {"0", "1", ">=2"}
    # subset [2, 1, 0] dealt over 4 classes: 2, 1, 0 and 2 training clips -> one unseen class
    assert sorted(results["train_label_counts"].values()) == [0, 1, 2, 2]
    assert c0["buckets"]["buckets"]["0"]["clips"] == 1 and c0["buckets"]["buckets"][">=2"]["clips"] == 2
    summary = {r["variant"]: r for r in results["summary"]}
    assert summary["none"]["metrics"]["kl"]["n"] == 2 and summary["none"]["metrics"]["kl"]["std"] is not None
    table = (out / "table.md").read_text()
    assert "| variant | retrieval | k | FAD ↓ | KL ↓ | top-1 ↑ | seeds |" in table
    assert "| none | none | - |" in table and "| audio+text-k2 | audio+text | 2 |" in table and " ± " in table
    assert "## Per frequency bucket" in table and "0 (1 clips)" in table and "Not computed" in table
    for png in ("k_sweep.png", "longtail-kl.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png


@pytest.mark.slow  # the micro grid end to end
def test_a_rerun_skips_finished_cells_and_redoes_only_what_is_missing(micro):
    root, first, second = micro
    assert second["this_run"]["ran"] == {"prepare": 0, "train": 0, "generate": 0, "evaluate": 0}
    assert second["this_run"]["skipped"] == {"prepare": 0, "train": 2, "generate": 6, "evaluate": 6}
    assert second["summary"] == first["summary"]
    # a clip lost (e.g. an interrupted run) is regenerated; only its cell is generated and evaluated again
    from reaudio_core.experiment import run_experiment
    lost = root / "out" / "gen" / "audio+text-k1" / "1" / "dog0.wav"
    lost.unlink()
    os.environ["REAUDIO_CACHE"] = str(root / "cache")
    third = run_experiment(root / "exp.yaml", out=root / "out", progress=False)
    assert lost.exists()
    assert third["this_run"]["ran"] == {"prepare": 0, "train": 0, "generate": 1, "evaluate": 1}


@pytest.mark.slow  # the micro grid end to end
def test_longtail_cli_on_an_evaluation(micro, capsys, tmp_path):
    root, _, _ = micro
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("file,caption,label\n" + "".join(f"{c}0.wav,{t},{c}\n" for c, t in CLASSES.items()))
    rc = main(["longtail", "--train", str(root / "m.csv"), "--buckets", "0,1,2",
               "--eval", f"none={root / 'out' / 'eval' / 'none' / 'seed-0.json'}", "--prompts", str(prompts),
               "--out", str(tmp_path / "lt")])
    out = capsys.readouterr().out
    assert rc == 0 and "4 labels occur in training, 8 label occurrences" in out and "## Mean kl per bucket" in out
    data = json.loads((tmp_path / "lt" / "longtail.json").read_text())
    assert data["models"]["none"]["buckets"][">=2"]["kl"]["n"] == 4  # every class has 2 clips in m.csv
    assert (tmp_path / "lt" / "longtail-kl.png").exists()


@pytest.mark.slow  # the micro grid end to end
def test_training_include_ids_selects_and_checks_items(micro):
    from reaudio_core import training as T
    from reaudio_core.config import compose
    from reaudio_core.distributed import DistEnv
    root, _, _ = micro
    db = root / "out" / "db"
    stage = T.LdmStage(compose(None, [root / "base.yaml"], [f"training.database={db}", "training.include_ids=[1,6]"]),
                       DistEnv(), progress=False)
    assert [c.index for c in stage.dataset.clips] == [1, 6]
    with pytest.raises(ReaudioError, match="include_ids: \\[99\\] are not item ids"):
        T.LdmStage(compose(None, [root / "base.yaml"], [f"training.database={db}", "training.include_ids=[0,99]"]),
                   DistEnv(), progress=False)


def test_override_values_are_plain_yaml_and_tags_are_refused(tmp_path):
    from reaudio_core.experiment import load_experiment
    from reaudio_core.registry import ReaudioError
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("name: t\nseeds: [0, 1]\n")
    spec = load_experiment(cfg, ["seeds=[3]"], out=tmp_path / "out")
    assert spec["seeds"] == [3]
    marker = tmp_path / "ran"
    with pytest.raises(ReaudioError, match="not plain YAML"):
        load_experiment(cfg, [f"seeds=!!python/object/apply:os.system ['touch {marker}']"], out=tmp_path / "out")
    assert not marker.exists()
