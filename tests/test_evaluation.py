"""Evaluation: metric maths, feature-model loaders in their published layouts, bad inputs, the cache,
the shipped ESC-50 classifier, the CLI, and a contract test over every registered feature model."""
import csv
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from component_factories import tiny
from conftest import make_clip

from reaudio_core.cli import main as cli_main
from reaudio_core.evaluation import (evaluate, frechet_distance, gaussian, inception_score, kl_per_pair,
                                     to_markdown)
from reaudio_core.registry import ReaudioError, get_registry


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REAUDIO_CACHE", str(tmp_path / "cache"))


def write_set(folder, names, sr=16000, seconds=1.0, base=200.0):
    for i, n in enumerate(names):
        make_clip(folder / f"{n}.wav", seconds=seconds, sr=sr, freq=base * (1 + i % 7), seed=i)
    return folder


# -- metric maths against independent computations ----------------------------------------------
def test_frechet_distance_matches_scipy_formula_and_is_zero_for_identical_sets():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 6)), rng.normal(0.5, 2.0, size=(200, 6)) @ rng.normal(size=(6, 6))
    (m1, s1), (m2, s2) = gaussian(a), gaussian(b)
    root = linalg.sqrtm(s1 @ s2).real
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-6)
    assert np.allclose(s1, np.cov(a.T))  # unbiased covariance, as audioldm_eval
    assert frechet_distance(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-8)
    # rank-deficient covariances (fewer frames than dimensions) stay finite and ~0 for identical sets
    few = rng.normal(size=(4, 10))
    assert frechet_distance(*gaussian(few), *gaussian(few)) == pytest.approx(0.0, abs=1e-6)


def test_kl_matches_direct_sum_and_is_zero_for_identical():
    rng = np.random.default_rng(1)
    ref, gen = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    p = np.exp(ref) / np.exp(ref).sum(1, keepdims=True)
    q = np.exp(gen) / np.exp(gen).sum(1, keepdims=True)
    assert np.allclose(kl_per_pair(ref, gen), (p * np.log(p / q)).sum(1))
    assert np.all(kl_per_pair(ref, gen) > 0)
    assert np.allclose(kl_per_pair(ref, ref), 0.0, atol=1e-12)


def test_inception_score_uniform_is_one_and_matches_direct_computation():
    mean, std = inception_score(np.zeros((20, 5)), splits=10)
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)
    # confident and evenly spread over 4 classes -> close to 4
    sharp = np.eye(4)[np.arange(40) % 4] * 30
    assert inception_score(sharp, splits=2, seed=None)[0] == pytest.approx(4.0, rel=1e-6)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 6)) * 2
    p = np.exp(x) / np.exp(x).sum(1, keepdims=True)
    direct = [math.exp(np.mean((c * np.log(c / c.mean(0))).sum(1))) for c in (p[:10], p[10:20], p[20:])]
    got = inception_score(x, splits=3, seed=None)
    assert got[0] == pytest.approx(np.mean(direct)) and got[1] == pytest.approx(np.std(direct))
    with pytest.raises(ValueError, match="at least 10 clips"):
        inception_score(x[:9], splits=10)


# -- VGGish: torchvggish layout ------------------------------------------------------------------
def torchvggish_state(seed=0):
    """A random state dict with exactly the keys/shapes of torchvggish's vggish-10086976.pth."""
    g = torch.Generator().manual_seed(seed)
    state, cin = {}, 1
    for idx, c in zip((0, 3, 6, 8, 11, 13), (64, 128, 256, 256, 512, 512)):
        state[f"features.{idx}.weight"] = torch.randn(c, cin, 3, 3, generator=g) / math.sqrt(9 * cin)
        state[f"features.{idx}.bias"] = torch.randn(c, generator=g) * 0.1
        cin = c
    for idx, (i, o) in zip((0, 2, 4), ((12288, 4096), (4096, 4096), (4096, 128))):
        state[f"embeddings.{idx}.weight"] = torch.randn(o, i, generator=g) / math.sqrt(i)
        state[f"embeddings.{idx}.bias"] = torch.randn(o, generator=g) * 0.1
    return state


def reference_vggish(state, x):
    """torchvggish's forward written out (features, NHWC flatten), final ReLU dropped as audioldm_eval."""
    for idx in (0, 3, 6, 8, 11, 13):
        x = F.relu(F.conv2d(x, state[f"features.{idx}.weight"], state[f"features.{idx}.bias"], padding=1))
        if idx in (0, 3, 8, 13):
            x = F.max_pool2d(x, 2)
    x = torch.transpose(torch.transpose(x, 1, 3), 1, 2).contiguous().view(x.size(0), -1)
    x = F.relu(F.linear(x, state["embeddings.0.weight"], state["embeddings.0.bias"]))
    x = F.relu(F.linear(x, state["embeddings.2.weight"], state["embeddings.2.bias"]))
    return F.linear(x, state["embeddings.4.weight"], state["embeddings.4.bias"])


def tf_vggish_examples(wav):
    """The TF VGGish front end (mel_features.py) in plain numpy, loops and all."""
    win, hop, nfft = 400, 160, 512
    n = 1 + (len(wav) - win) // hop
    frames = np.stack([wav[i * hop:i * hop + win] for i in range(n)])
    window = 0.5 - 0.5 * np.cos(2 * np.pi / win * np.arange(win))
    spec = np.abs(np.fft.rfft(frames * window, nfft))
    def mel(f):
        return 1127.0 * np.log(1.0 + f / 700.0)
    bins = mel(np.linspace(0, 8000, nfft // 2 + 1))
    edges = np.linspace(mel(125.0), mel(7500.0), 66)
    weights = np.empty((nfft // 2 + 1, 64))
    for i in range(64):
        lo, c, hi = edges[i:i + 3]
        weights[:, i] = np.maximum(0.0, np.minimum((bins - lo) / (c - lo), (hi - bins) / (hi - c)))
    weights[0, :] = 0.0
    logmel = np.log(spec @ weights + 0.01)
    k = 1 + (len(logmel) - 96) // 96
    return np.stack([logmel[i * 96:(i + 1) * 96] for i in range(k)])


@pytest.fixture(scope="module")
def vggish_ckpt(tmp_path_factory):
    state = torchvggish_state()
    path = tmp_path_factory.mktemp("vggish") / "vggish-10086976.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.slow  # a published-size model or a subprocess: seconds
def test_vggish_loads_published_layout_and_matches_reference_forward(vggish_ckpt):
    from reaudio_plugins.vggish import examples, mel_matrix
    path, state = vggish_ckpt
    model = get_registry().create("feature_model", "vggish", checkpoint=str(path))
    assert set(model.net.state_dict()) == set(state)  # no missing / unexpected keys
    wav = np.random.default_rng(0).normal(0, 0.1, 16000 * 2 + 123).astype(np.float32)
    ex = examples(wav, mel_matrix())
    assert ex.shape == (2, 1, 96, 64)
    assert np.allclose(ex[:, 0].numpy(), tf_vggish_examples(wav.astype(np.float64)), atol=2e-4)
    frames = model.embed_frames([wav])[0]
    with torch.no_grad():
        expected = reference_vggish(state, ex).numpy()
    assert frames.shape == (2, 128)
    assert np.allclose(frames, expected, atol=1e-4, rtol=1e-4)
    assert (frames < 0).any()  # the final ReLU is gone
    # a short clip is padded to one example
    assert model.embed_frames([wav[:4000]])[0].shape == (1, 128)


def test_vggish_rejects_a_wrong_checkpoint_and_missing_weights(tmp_path, vggish_ckpt, monkeypatch):
    _, state = vggish_ckpt
    bad = {k: state[k] for k in ("features.0.weight", "features.0.bias")}
    bad["embeddings.6.weight"] = state["embeddings.4.weight"]
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ReaudioError, match=r"missing.*embeddings.0.bias.*unexpected.*embeddings.6.weight"):
        get_registry().create("feature_model", "vggish", checkpoint=str(tmp_path / "bad.pth"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no default checkpoint to find
    with pytest.raises(ReaudioError, match="vggish-10086976.pth"):
        get_registry().create("feature_model", "vggish")


# -- PANNs Cnn14 16 kHz: {'model': state_dict} ---------------------------------------------------
def panns_state(seed=0, front_end=True):
    """Random weights under the exact keys of Cnn14_16k_mAP=0.438.pth; the STFT/mel front end is real."""
    import torchaudio.functional as AF
    g = torch.Generator().manual_seed(seed)
    s = {}
    if front_end:
        n, k = torch.arange(512, dtype=torch.float64), torch.arange(257, dtype=torch.float64)[:, None]
        w = 0.5 - 0.5 * torch.cos(2 * math.pi * n / 512)
        angle = 2 * math.pi * ((k * n) % 512) / 512
        s["spectrogram_extractor.stft.conv_real.weight"] = (torch.cos(angle) * w)[:, None].float()
        s["spectrogram_extractor.stft.conv_imag.weight"] = (-torch.sin(angle) * w)[:, None].float()
        s["logmel_extractor.melW"] = AF.melscale_fbanks(257, 50.0, 8000.0, 64, 16000, norm="slaney",
                                                        mel_scale="slaney")

    def bn(prefix, c):
        s[f"{prefix}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        s[f"{prefix}.bias"] = 0.1 * torch.randn(c, generator=g)
        s[f"{prefix}.running_mean"] = 0.1 * torch.randn(c, generator=g)
        s[f"{prefix}.running_var"] = 0.5 + torch.rand(c, generator=g)
        s[f"{prefix}.num_batches_tracked"] = torch.tensor(1000)
    bn("bn0", 64)
    chans = (1, 64, 128, 256, 512, 1024, 2048)
    for i in range(6):
        ci, co = chans[i], chans[i + 1]
        s[f"conv_block{i + 1}.conv1.weight"] = torch.randn(co, ci, 3, 3, generator=g) * math.sqrt(2 / (9 * ci))
        s[f"conv_block{i + 1}.conv2.weight"] = torch.randn(co, co, 3, 3, generator=g) * math.sqrt(2 / (9 * co))
        bn(f"conv_block{i + 1}.bn1", co)
        bn(f"conv_block{i + 1}.bn2", co)
    for name, (i, o) in (("fc1", (2048, 2048)), ("fc_audioset", (2048, 527))):
        s[f"{name}.weight"] = torch.randn(o, i, generator=g) / math.sqrt(i)
        s[f"{name}.bias"] = 0.1 * torch.randn(o, generator=g)
    return s


def reference_cnn14(s, wav):
    """audioldm_eval's Cnn14 forward, written out with torch.stft as the front end."""
    spec = torch.stft(wav, 512, 160, 512, torch.hann_window(512), center=True, pad_mode="reflect",
                      return_complex=True).abs() ** 2
    x = 10 * torch.log10((spec.transpose(1, 2) @ s["logmel_extractor.melW"]).clamp(min=1e-10))[:, None]

    def bn(x, p):
        return F.batch_norm(x, s[f"{p}.running_mean"], s[f"{p}.running_var"], s[f"{p}.weight"], s[f"{p}.bias"],
                            False, 0.0, 1e-5)
    x = bn(x.transpose(1, 3), "bn0").transpose(1, 3)
    for i in range(1, 7):
        p = f"conv_block{i}"
        x = F.relu(bn(F.conv2d(x, s[f"{p}.conv1.weight"], padding=1), f"{p}.bn1"))
        x = F.relu(bn(F.conv2d(x, s[f"{p}.conv2.weight"], padding=1), f"{p}.bn2"))
        x = F.avg_pool2d(x, (2, 2) if i < 6 else (1, 1))
    x = torch.mean(x, dim=3)
    x = torch.max(x, dim=2)[0] + torch.mean(x, dim=2)
    emb = F.relu(F.linear(x, s["fc1.weight"], s["fc1.bias"]))
    return emb, F.linear(emb, s["fc_audioset.weight"], s["fc_audioset.bias"])


@pytest.mark.slow  # a published-size model or a subprocess: seconds
def test_panns_loads_published_layout_and_matches_reference_forward(tmp_path):
    state = panns_state()
    torch.save({"model": state, "iteration": 0}, tmp_path / "Cnn14_16k_mAP=0.438.pth")
    model = get_registry().create("feature_model", "panns-cnn14", checkpoint=str(tmp_path / "Cnn14_16k_mAP=0.438.pth"))
    assert set(model.net.state_dict()) == set(state)  # no missing / unexpected keys
    rng = np.random.default_rng(0)
    wavs = [rng.normal(0, 0.1, 16000).astype(np.float32) for _ in range(2)]
    frames, logits = model.embed_and_logits(wavs)
    with torch.no_grad():
        emb, ref_logits = reference_cnn14(state, torch.from_numpy(np.stack(wavs)))
    assert logits.shape == (2, 527) and frames[0].shape == (1, 2048)
    assert torch.allclose(logits, ref_logits, atol=1e-3, rtol=1e-3)
    assert np.allclose(np.concatenate(frames), emb.numpy(), atol=1e-3, rtol=1e-3)
    # a trimmed checkpoint without the fixed front end still loads (and computes the same)
    front = ("spectrogram_extractor.", "logmel_extractor.")
    torch.save({"model": {k: v for k, v in state.items() if not k.startswith(front)}}, tmp_path / "trimmed.pth")
    trimmed = get_registry().create("feature_model", "panns-cnn14", checkpoint=str(tmp_path / "trimmed.pth"))
    for k, v in trimmed.net.state_dict().items():
        assert torch.allclose(v.float(), state[k].float(), atol=1e-6), k
    torch.save({"model": {"fc1.weight": state["fc1.weight"], "fc2.weight": state["fc1.weight"]}}, tmp_path / "bad.pth")
    with pytest.raises(ReaudioError, match="missing.*bn0.*unexpected.*fc2.weight"):
        get_registry().create("feature_model", "panns-cnn14", checkpoint=str(tmp_path / "bad.pth"))


# -- the shipped offline classifier ---------------------------------------------------------------
def test_shipped_esc50_classifier_classifies_real_clips(shared_data):
    model = get_registry().create("feature_model", "esc50-classifier")
    assert model.num_classes == 50 and len(model.labels) == 50
    rows = list(csv.DictReader((shared_data / "esc50-fold4" / "metadata.csv").open()))
    one_per_class = {}
    for r in rows:
        one_per_class.setdefault(r["category"], r)
    from reaudio_core.audio import load_audio
    wavs = [load_audio(shared_data / "esc50-fold4" / r["file"]) for r in one_per_class.values()]
    predicted = [label for label, _ in model.classify(wavs)]
    accuracy = np.mean([p == r["category"] for p, r in zip(predicted, one_per_class.values())])
    # these clips were in the training set (the held-out accuracy is in the model card); chance is 0.02
    assert accuracy > 0.5, accuracy


# -- evaluate(): bad input, pairing, cache, CLI -----------------------------------------------------
def test_no_common_names_silent_empty_unreadable_and_mismatched_rates(tmp_path):
    gen = write_set(tmp_path / "gen", [f"g{i:02d}" for i in range(12)])
    sf.write(gen / "silent.wav", np.zeros(16000, np.float32), 16000)
    sf.write(gen / "empty.wav", np.zeros(0, np.float32), 16000)
    (gen / "broken.flac").write_bytes(b"this is not audio")
    ref = write_set(tmp_path / "ref", [f"r{i:02d}" for i in range(12)], sr=22050)
    r = evaluate(gen, ref)
    assert r["metrics"]["kl"] is None and "KL needs pairs" in r["not_computed"]["kl"]
    reasons = {e["file"].split("/")[-1]: e["reason"] for e in r["excluded"]}
    assert set(reasons) == {"silent.wav", "empty.wav", "broken.flac"}
    assert "silent" in reasons["silent.wav"] and "empty" in reasons["empty.wav"]
    assert "unreadable" in reasons["broken.flac"]
    assert r["set_size"]["generated"] == 12 and r["set_size"]["reference"] == 12
    assert any("22050 Hz" in n and "resampled to 16000 Hz" in n for n in r["notes"])
    assert any("sample rates differ" in w for w in r["warnings"])
    assert r["metrics"]["fad"] is not None and r["metrics"]["is"] is not None
    md = to_markdown(r)
    assert "KL needs pairs" in md and "silent.wav" in md and "esc50-classifier" in md and "16000 Hz" in md


def test_too_few_clips_for_is_and_paired_kl(tmp_path):
    names = ["dog", "rain", "bell"]
    gen = write_set(tmp_path / "gen", names, base=300.0)
    ref = tmp_path / "ref"
    for i, n in enumerate(names):  # same names, other format: pairs by name, suffix ignored
        make_clip(ref / f"{n}.flac", freq=250.0 * (i + 1), seed=10 + i)
    make_clip(ref / "extra.wav", seed=99)
    r = evaluate(gen, ref)
    assert r["metrics"]["is"] is None
    assert "at least 10 generated clips" in r["not_computed"]["is"] and "got 3" in r["not_computed"]["is"]
    assert r["set_size"]["pairs"] == 3 and r["metrics"]["kl"] > 0
    assert any("no partner" in n for n in r["notes"])
    per_item = {i["name"]: i for i in r["items"]}
    assert np.mean([per_item[n]["kl"] for n in names]) == pytest.approx(r["metrics"]["kl"])
    # identical folders: KL 0 and FAD ~0
    same = evaluate(gen, gen)
    assert same["metrics"]["kl"] == pytest.approx(0.0, abs=1e-9)
    assert same["metrics"]["fad"] == pytest.approx(0.0, abs=1e-3)


def test_all_clips_unusable_is_a_clear_error(tmp_path):
    gen = tmp_path / "gen"
    gen.mkdir()
    sf.write(gen / "a.wav", np.zeros(8000, np.float32), 16000)
    ref = write_set(tmp_path / "ref", ["x"])
    with pytest.raises(ReaudioError, match="no usable clips in the generated folder.*silent"):
        evaluate(gen, ref)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no audio here")
    with pytest.raises(ReaudioError, match="no audio files in reference folder"):
        evaluate(tmp_path / "ref", tmp_path / "notes")
    with pytest.raises(ReaudioError, match="reference folder not found"):
        evaluate(tmp_path / "ref", tmp_path / "nothing-here")


def test_cache_is_keyed_on_content_never_stale(tmp_path):
    gen = write_set(tmp_path / "gen", ["a", "b", "c"])
    ref = write_set(tmp_path / "ref", ["a", "b", "c"], base=260.0)
    first = evaluate(gen, ref)
    assert first["cache"]["computed"] == 6 and first["cache"]["hits"] == 0
    again = evaluate(gen, ref)
    assert again["cache"]["hits"] == 6 and again["cache"]["computed"] == 0
    assert again["metrics"] == first["metrics"]
    make_clip(gen / "b.wav", freq=1234.0, seed=7)  # same name, new content
    changed = evaluate(gen, ref)
    assert changed["cache"]["computed"] == 1 and changed["cache"]["hits"] == 5
    fresh = evaluate(gen, ref, use_cache=False)
    for key in ("fad", "kl"):  # equal up to batch-composition rounding; the changed clip moved the score
        assert changed["metrics"][key] == pytest.approx(fresh["metrics"][key], rel=1e-4)
        assert changed["metrics"][key] != pytest.approx(first["metrics"][key], rel=1e-2)


def test_cli_json_and_markdown(tmp_path, capsys):
    gen = write_set(tmp_path / "gen", [f"c{i}" for i in range(10)])
    ref = write_set(tmp_path / "ref", [f"c{i}" for i in range(10)], base=230.0)
    assert cli_main(["evaluate", "--generated", str(gen), "--reference", str(ref), "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["feature_models"]["fad"]["name"] == "esc50-classifier"
    assert out["sample_rate"] == 16000
    assert out["set_size"]["generated"] == 10 and out["set_size"]["pairs"] == 10
    assert all(out["metrics"][k] is not None for k in ("fad", "kl", "is"))
    assert "prompts" in out["not_computed"]["clap_score"]
    assert cli_main(["evaluate", "--generated", str(gen), "--reference", str(ref), "--quiet"]) == 0
    md = capsys.readouterr().out
    assert "| FAD |" in md and "`esc50-classifier`" in md and "16000 Hz" in md and "10 gen / 10 ref clips" in md
    assert cli_main(["evaluate", "--generated", str(tmp_path / "missing"), "--reference", str(ref)]) == 2
    assert "generated folder not found" in capsys.readouterr().err


def test_clap_score_with_prompts(tmp_path):
    clap = tiny("feature_model", "clap")
    gen = write_set(tmp_path / "gen", ["dog", "rain"])
    ref = write_set(tmp_path / "ref", ["dog", "rain"], base=250.0)
    (tmp_path / "p.csv").write_text("file,prompt\ndog.wav,a dog barks\nrain.wav,rain on a roof\n")
    r = evaluate(gen, ref, clap=clap, prompts=tmp_path / "p.csv")
    from reaudio_core.audio import load_audio
    a = clap.embed_frames([load_audio(gen / "dog.wav"), load_audio(gen / "rain.wav")])
    t = clap.embed_text(["a dog barks", "rain on a roof"]).numpy()
    cos = [float(x[0] @ y / np.linalg.norm(x[0]) / np.linalg.norm(y)) for x, y in zip(a, t)]
    assert r["metrics"]["clap_score"] == pytest.approx(100 * np.mean(cos), abs=1e-3)
    assert r["feature_models"]["clap"]["name"] == "clap"


# -- contract over every registered feature model (rules: reaudio_core/testing/) -----------------------


def test_esc50_classifier_training_augmentations():
    """SpecAugment masks bands and stretches with each clip's mean, reproducibly; training with SpecAugment
    and mixup is reproducible for a seed and differs from training without them."""
    from reaudio_plugins import esc50_classifier as C
    mel = torch.randn(3, 1, 100, 64)
    a = C.spec_augment(mel, torch.Generator().manual_seed(0), max_bins=8, max_frames=20)
    b = C.spec_augment(mel, torch.Generator().manual_seed(0), max_bins=8, max_frames=20)
    assert a.shape == mel.shape and torch.equal(a, b) and not torch.equal(a, mel)
    changed = a != mel
    for i in range(3):
        assert torch.allclose(a[i][changed[i]], mel[i].mean().expand(int(changed[i].sum())))
        assert changed[i].float().mean() < 0.6  # at most 2 x 8 of 64 bins and 2 x 20 of 100 frames
    t = np.arange(16000) / 16000
    x = np.stack([0.3 * np.sin(2 * np.pi * (300 if k % 2 else 2000) * t) for k in range(8)]).astype(np.float32)
    y = np.array([k % 2 for k in range(8)])
    torch.set_num_threads(1)

    def weights(**aug):
        net, _ = C.train_model(x, y, ["low", "high"], dict(C.DEFAULT_CONFIG), epochs=2, seed=0, batch_size=4,
                               crop_seconds=0.8, log=lambda m: None, **aug)
        return torch.cat([p.detach().flatten() for p in net.parameters()])

    augmented = weights(specaugment=True, mixup=0.2)
    assert torch.isfinite(augmented).all()
    assert torch.equal(augmented, weights(specaugment=True, mixup=0.2))
    assert not torch.equal(augmented, weights())
    assert not torch.equal(weights(specaugment=True), weights(mixup=0.2))
