"""Components checked where they meet the core (reaudio_core/checks.py): every contract violation is a
ContractViolation naming the component, its distribution and the method; parameter types are checked at
config time; another encoder than the model was trained with is a warning naming both; checked components
stay what they were (isinstance, attributes, training, pickling)."""
import copy
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from reaudio_core import checks
from reaudio_core.checks import ContractViolation
from reaudio_core.interfaces import (AudioEncoder, Conditioning, Decoder, Denoiser, FeatureModel, Retriever,
                                     TextEncoder, Vocoder)
from reaudio_core.plugins import PluginInfo
from reaudio_core.registry import ComponentSpec, ParamTypeError, Registry, get_registry, param_type_problem

DIST = "fake-dist 9.9"


# -- fakes: each returns what its constructor tells it to, right or wrong ------------------------------------
class FakeText(TextEncoder):
    def __init__(self, *, dim=8, scale=1.0, zero_for=(), tokens_off=0):
        self.dim = self.token_dim = dim
        self.scale, self.zero_for, self.tokens_off = scale, set(zero_for), tokens_off

    def embed(self, texts):
        g = torch.Generator().manual_seed(0)
        out = nn.functional.normalize(torch.randn(len(texts), self.dim, generator=g), dim=-1) * self.scale
        for i, t in enumerate(texts):
            if t in self.zero_for:
                out[i] = 0
        return out

    def encode_tokens(self, texts, max_tokens=None):
        L = (max_tokens or 5) + self.tokens_off
        return torch.zeros(len(texts), L, self.token_dim), torch.ones(len(texts), L, dtype=torch.bool)


class FakeAudio(AudioEncoder):
    def __init__(self, *, dim=6, num_tokens=32, gives_tokens=32, n_mfcc=20, dtype="float32"):
        self.dim = self.token_dim = dim
        self.num_tokens, self.gives_tokens, self.dtype = num_tokens, gives_tokens, getattr(torch, dtype)

    def embed(self, waveforms):
        out = torch.zeros(len(waveforms), self.dim, dtype=self.dtype)
        out[:, 0] = 1
        return out

    def encode_tokens(self, waveforms):
        n = self.gives_tokens
        return torch.zeros(len(waveforms), n, self.token_dim), torch.ones(len(waveforms), n, dtype=torch.bool)


class FakeRetriever(Retriever):
    def __init__(self, *, bad=None):
        self.bad, self.n = bad, 4

    dim = 3

    def __len__(self):
        return self.n

    def add(self, vectors):
        pass

    def search(self, queries, k):
        scores = np.zeros((len(queries), k), np.float32)
        ids = np.tile(np.arange(k, dtype=np.int64), (len(queries), 1))
        ids[:, self.n:], scores[:, self.n:] = -1, -np.inf  # fewer items than k: -1 padding
        if self.bad == "id":
            ids[0, 0] = self.n
        elif self.bad == "dtype":
            ids = ids.astype(np.int32)
        elif self.bad == "shape":
            scores = scores[:, :-1]
        return scores, ids

    def save(self, directory):
        pass

    @classmethod
    def load(cls, directory, **params):
        return cls()


class FakeDecoder(Decoder):
    latent_channels, compression, scale_factor = 8, 4, 1.0

    def __init__(self, *, channels=8, extra_frames=0):
        self.channels, self.extra = channels, extra_frames

    def encode(self, mel, sample=False):
        return torch.zeros(mel.shape[0], self.channels, mel.shape[1] // 4, 16)

    def decode(self, latents):
        return torch.zeros(latents.shape[0], latents.shape[2] * 4 + self.extra, 64)


class FakeVocoder(Vocoder):
    sample_rate, hop_length = 16000, 160

    def __init__(self, *, short=0):
        self.short = short

    def __call__(self, mel):
        return torch.zeros(mel.shape[0], mel.shape[1] * 160 - self.short)


class FakeDenoiser(Denoiser, nn.Module):
    """An nn.Module component: the checks must leave it trainable."""
    in_channels, downsample, prompt_dim, text_dim, audio_dim = 2, 1, 4, None, None

    __call__ = nn.Module.__call__

    def __init__(self, *, crop=0):
        nn.Module.__init__(self)
        self.crop = crop
        self.lin = nn.Linear(2, 2)

    def forward(self, latents, timesteps, cond):
        out = self.lin(latents.transpose(1, -1)).transpose(1, -1)
        return out[..., self.crop:]


class FakeFeatures(FeatureModel):
    name, sample_rate, num_classes, fingerprint = "fake", 16000, 3, "x"

    def __init__(self, *, widths=(4, 4), bad=False):
        self.widths, self.bad = widths, bad

    def embed_frames(self, wavs):
        out = [np.zeros((2, w), np.float32) for w, _ in zip(self.widths, wavs)]
        if self.bad:
            out[0][0, 0] = np.nan
        return out

    def logits(self, wavs):
        return torch.zeros(len(wavs), self.num_classes + (1 if self.bad else 0))


FAKES = {("text_encoder", "hashtext"): FakeText, ("audio_encoder", "mfcc"): FakeAudio,
         ("retriever", "fakeidx"): FakeRetriever, ("decoder", "fakevae"): FakeDecoder,
         ("vocoder", "fakevoc"): FakeVocoder, ("denoiser", "fakeden"): FakeDenoiser,
         ("feature_model", "fakefeat"): FakeFeatures}


@pytest.fixture(scope="module")
def reg():
    """A registry of the fakes alone, provided by the distribution 'fake-dist 9.9'."""
    info = PluginInfo("fakes", "tests.test_checks", "fake-dist", "9.9")
    return Registry({}, [info], [("fakes", kind, name, cls, {}, None) for (kind, name), cls in FAKES.items()])


def raises(what: str, method: str):
    """pytest.raises for a violation whose message names the component, its distribution and the method."""
    return pytest.raises(ContractViolation, match=rf"^{what} \({DIST}\)\.{method} returned ")


# -- each violation, named --------------------------------------------------------------------------------
def test_unnormalised_text_embedding(reg):
    enc = reg.create("text_encoder", "hashtext", scale=3.2)
    with raises("text_encoder 'hashtext'", "embed") as err:
        enc.embed(["a dog", "rain"])
    assert "L2 norm 3.2" in str(err.value) and "expected 1 +- 0.001" in str(err.value)
    assert reg.create("text_encoder", "hashtext").embed(["a dog"]).shape == (1, 8)  # a right one passes


def test_zero_rows_are_refused_for_every_text_even_the_empty_one(reg):
    enc = reg.create("text_encoder", "hashtext", zero_for=["dog", ""])
    with raises("text_encoder 'hashtext'", "embed") as err:
        enc.embed(["rain", "dog"])
    assert "all-zero row for 'dog' (row 1)" in str(err.value)
    with raises("text_encoder 'hashtext'", "embed") as err:  # the unconditional prompt must be a unit row too
        enc.embed([""])
    assert "all-zero row for '' (row 0)" in str(err.value)


def test_text_embedding_shape_dtype_and_finite(reg):
    class Wide(FakeText):
        def embed(self, texts):
            return super().embed(texts)[:, :5]

    class Half(FakeText):
        def embed(self, texts):
            return super().embed(texts).half()

    class NaN(FakeText):
        def embed(self, texts):
            return super().embed(texts) * float("nan")

    for cls, expected in ((Wide, r"shape \[2, 5\] \(expected \[2, 8\] = \[B, dim\]\)"),
                          (Half, "dtype torch.float16"), (NaN, "16 non-finite values of 16")):
        with raises("text_encoder 'hashtext'", "embed") as err:  # wrap: what the pipeline does for from_pretrained
            reg.wrap("text_encoder", "hashtext", cls()).embed(["a", "b"])
        assert err.match(expected)


def test_text_tokens_honour_max_tokens(reg):
    enc = reg.create("text_encoder", "hashtext", tokens_off=1)
    with raises("text_encoder 'hashtext'", "encode_tokens") as err:
        enc.encode_tokens(["a dog"], max_tokens=50)
    assert err.match(r"states of shape \[1, 51, 8\] \(expected \[1, 50, 8\] = \[B, max_tokens, token_dim\]\)")
    states, mask = reg.create("text_encoder", "hashtext").encode_tokens(["a", "b"], 7)
    assert states.shape == (2, 7, 8) and mask.dtype == torch.bool


def test_wrong_audio_token_count(reg):
    """7 tokens from an encoder that promises 32: named at the encoder, not a RuntimeError in Conditioning.cat."""
    enc = reg.create("audio_encoder", "mfcc", gives_tokens=7)
    with raises("audio_encoder 'mfcc'", "encode_tokens") as err:
        enc.encode_tokens([np.zeros(160, np.float32)] * 3)
    assert "7 tokens per clip" in str(err.value) and "num_tokens=32" in str(err.value)


def test_audio_embedding_dtype(reg):
    with raises("audio_encoder 'mfcc'", "embed") as err:
        reg.create("audio_encoder", "mfcc", dtype="float64").embed([np.ones(160, np.float32)])
    assert "torch.float64" in str(err.value)


@pytest.mark.parametrize("bad,expected", [("id", r"id 4 \(expected ids in \[0, 4\)"), ("dtype", "ids of dtype int32"),
                                          ("shape", r"scores of shape \[2, 5\] \(expected \[2, 6\] = \[Q, k\]\)")])
def test_retriever_search(reg, bad, expected):
    q = np.zeros((2, 3), np.float32)
    scores, ids = reg.create("retriever", "fakeidx").search(q, 6)  # -1 padding past the 4 items is fine
    assert (ids[:, 4:] == -1).all()
    with raises("retriever 'fakeidx'", "search") as err:
        reg.create("retriever", "fakeidx", bad=bad).search(q, 6)
    assert err.match(expected)


def test_decoder_vocoder_denoiser_shapes(reg):
    mel = torch.zeros(2, 32, 64)
    assert reg.create("decoder", "fakevae").decode(reg.create("decoder", "fakevae").encode(mel)).shape == mel.shape
    with raises("decoder 'fakevae'", "encode") as err:
        reg.create("decoder", "fakevae", channels=4).encode(mel)
    assert err.match(r"latents of shape \[2, 4, 8, 16\]")
    with raises("decoder 'fakevae'", "decode") as err:
        reg.create("decoder", "fakevae", extra_frames=1).decode(torch.zeros(2, 8, 8, 16))
    assert err.match(r"a mel of shape \[2, 33, 64\] \(expected \[2, 32, 64\]")
    assert reg.create("vocoder", "fakevoc")(mel).shape == (2, 32 * 160)
    with raises("vocoder 'fakevoc'", "__call__") as err:
        reg.create("vocoder", "fakevoc", short=1)(mel)
    assert err.match(r"shape \[2, 5119\] \(expected \[2, 5120\] = \[B, T \* hop_length\]\)")
    x, t, c = torch.zeros(2, 2, 4, 3), torch.zeros(2, dtype=torch.long), Conditioning(prompt=torch.zeros(2, 4))
    assert reg.create("denoiser", "fakeden")(x, t, c).shape == x.shape
    with raises("denoiser 'fakeden'", "__call__") as err:
        reg.create("denoiser", "fakeden", crop=1)(x, t, c)
    assert err.match(r"a prediction of shape \[2, 2, 4, 2\] \(expected the latents' shape \[2, 2, 4, 3\]\)")


def test_feature_model_outputs(reg):
    wavs = [np.zeros(16000, np.float32)] * 2
    good = reg.create("feature_model", "fakefeat")
    assert len(good.embed_frames(wavs)) == 2 and good.logits(wavs).shape == (2, 3)
    with raises("feature_model 'fakefeat'", "embed_frames") as err:
        reg.create("feature_model", "fakefeat", widths=(4, 5)).embed_frames(wavs)
    assert "widths [4, 5]" in str(err.value)
    with raises("feature_model 'fakefeat'", "embed_frames") as err:
        reg.create("feature_model", "fakefeat", bad=True).embed_frames(wavs)
    assert "entry 0 with 1 non-finite values of 8" in str(err.value)
    with raises("feature_model 'fakefeat'", "logits") as err:
        reg.create("feature_model", "fakefeat", bad=True).logits(wavs)
    assert err.match(r"logits of shape \[2, 4\] \(expected \[2, 3\] = \[B, num_classes\]\)")


def test_checks_can_be_switched_off(reg, monkeypatch):
    enc = reg.create("text_encoder", "hashtext", scale=2.0)
    with checks.disabled():
        assert enc.embed(["a"]).norm() == pytest.approx(2.0)  # checked object, checks off at run time
        assert not checks.is_checked(reg.create("text_encoder", "hashtext"))  # off at build time: not wrapped
    with raises("text_encoder 'hashtext'", "embed"):
        enc.embed(["a"])


def test_conditioning_mismatch_is_named_not_a_cat_error():
    class Den:
        prompt_dim, text_dim, audio_dim = 4, None, 6

    def audio(tokens):  # k = 3 retrieved clips of `tokens` tokens each
        return Conditioning(torch.zeros(1, 4), audio=torch.zeros(1, 3 * tokens, 6),
                            audio_mask=torch.ones(1, 3 * tokens, dtype=torch.bool))

    uncond, cond = audio(32), audio(7)
    checks.check_conditioning(uncond, uncond, Den())
    with pytest.raises(ContractViolation, match=r"'audio' stream from audio_encoder 'x': the conditional input has "
                                                r"shape \[1, 21, 6\], the unconditional \[1, 96, 6\]"):
        checks.check_conditioning(cond, uncond, Den(), {"audio": "audio_encoder 'x'"})


# -- the database build refuses what it would have stored ----------------------------------------------------
def _install(monkeypatch, kind, name, cls, defaults):
    """Register a fake in the process-wide registry for one test (as a plugin would)."""
    spec = ComponentSpec(kind, name, "fakes", dict(defaults), cls, "fake-dist", "9.9")
    monkeypatch.setitem(get_registry().components, (kind, name), spec)


def test_database_build_refuses_unnormalised_embeddings(monkeypatch, tmp_path, clip_factory):
    from reaudio_core.config import compose
    from reaudio_core.database import build_database
    _install(monkeypatch, "text_encoder", "rawtext", FakeText, {"dim": 8, "scale": 3.2, "zero_for": [],
                                                                "tokens_off": 0})
    rows = ["path,caption"] + [f"{clip_factory(f'c{i}.wav', seconds=0.5, seed=i).name},clip {i}" for i in range(3)]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    cfg = compose("offline", [], ["text_encoder=rawtext", "retriever=torch"])
    with raises("text_encoder 'rawtext'", "embed") as err:
        build_database([tmp_path / "m.csv"], tmp_path / "db", cfg, progress=False)
    assert "L2 norm 3.2" in str(err.value)
    assert not (tmp_path / "db" / "CURRENT").exists()


# -- parameter types, at config time ----------------------------------------------------------------------
def test_param_type_refused_at_config_time(monkeypatch):
    from reaudio_core.config import compose
    _install(monkeypatch, "audio_encoder", "mfcc", FakeAudio,
             {"dim": 6, "num_tokens": 32, "gives_tokens": 32, "n_mfcc": 20, "dtype": "float32"})
    with pytest.raises(ParamTypeError, match=r"audio_encoder 'mfcc' parameter 'n_mfcc' must be an integer, got 'abc' "
                                             r"\(str; the default is 20\)"):
        compose("offline", [], ["audio_encoder=mfcc", "audio_encoder.params.n_mfcc=abc"])
    cfg = compose("offline", [], ["audio_encoder=mfcc", "audio_encoder.params.n_mfcc=13"])
    assert cfg["audio_encoder"]["params"]["n_mfcc"] == 13


@pytest.mark.parametrize("value,default,ok", [
    (3, 2.5, True), (3.5, 2, False), (2.0, 2, False), (True, 2, False), (1, True, False), (False, True, True),
    ("x", None, True), (None, 5, True), ("abc", 5, False), (7, "cpu", False), ([1, 2], [3], True),
    ((1, 2), [3], True), ([1, "a"], [3], False), ([[1, 2]], [[1, 3, 5]], True), ([[1.5]], [[1]], False),
    (5, [1], False), ({"name": "unet-ldm", "params": {"size": "tiny"}}, {"name": "unet-ldm", "params": {}}, True),
    ({"name": 3}, {"name": "unet-ldm"}, False), ([], [1, "mixed"], True), (np.int64(3), 1, True),
])
def test_param_type_rules(value, default, ok):
    assert (param_type_problem(value, default) is None) == ok


def test_registered_defaults_and_tiny_params_pass_their_own_types():
    from component_factories import TINY_PARAMS
    r = get_registry()
    for (kind, name), spec in r.components.items():
        r.resolve_params(kind, name, spec.defaults)
        r.resolve_params(kind, name, TINY_PARAMS.get((kind, name), {}))


# -- the encoders a model was trained with -----------------------------------------------------------------
def test_encoder_swap_notes():
    trained = {"text_encoder": {"name": "minilm", "params": {"device": "cpu", "max_length": 256}},
               "audio_encoder": {"name": "vae-latent", "params": {"weights": "a", "num_tokens": 32}}}
    same = {"text_encoder": {"name": "minilm", "params": {"device": "cuda", "max_length": 256}},
            "audio_encoder": {"name": "vae-latent", "params": {"weights": "b", "num_tokens": 32}}}
    assert checks.encoder_swaps(trained, same, loaded=["audio_encoder"]) == []  # runtime knobs, weights from the model
    other = {**same, "text_encoder": {"name": "hashtext", "params": {}},
             "audio_encoder": {"name": "vae-latent", "params": {"weights": "a", "num_tokens": 7}}}
    notes = checks.encoder_swaps(trained, other, "the model in M")
    assert notes[0].startswith("the model in M was trained with text_encoder 'minilm', this run uses text_encoder "
                               "'hashtext'")
    assert "num_tokens 32 -> 7" in notes[1]


def test_generating_with_another_text_encoder_warns_naming_both(monkeypatch, tmp_path, capsys):
    """The shipped offline model with a prompt encoder it was not trained with: a warning and a CLI note, not an
    error (the dimension still fits); every component of the pipeline is checked, weights-loaded ones too."""
    from reaudio_core.cli import main
    from reaudio_core.pipeline import ReAudioPipeline
    _install(monkeypatch, "text_encoder", "hash384", FakeText, {"dim": 384, "scale": 1.0, "zero_for": [],
                                                                "tokens_off": 0})
    built, from_config = [], ReAudioPipeline.from_config.__func__
    monkeypatch.setattr(ReAudioPipeline, "from_config",
                        classmethod(lambda cls, *a, **kw: built.append(from_config(cls, *a, **kw)) or built[-1]))
    # the CLI turns warnings into one-line notes on stderr
    assert main(["generate", "a dog barks", "-o", str(tmp_path / "x.wav"), "text_encoder=hash384",
                 "generation.retrieval=none", "--steps", "1", "--duration", "0.32", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("'minilm', this run uses text_encoder 'hash384'") == 1, err  # said once, on one line
    assert "reaudio: warning: the model in" in err
    for slot in ("text_encoder", "caption_encoder", "audio_encoder", "denoiser", "decoder", "vocoder"):
        assert checks.is_checked(getattr(built[0], slot)), slot


def test_matching_encoders_give_no_note():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        from reaudio_core.config import compose, load_config
        from reaudio_core.pipeline import resolve_path
        cfg = compose("offline")
        model = resolve_path(cfg["generation"]["model"])
        assert checks.encoder_swaps(load_config(model), cfg, loaded=["audio_encoder"]) == []


# -- checked components stay what they were ------------------------------------------------------------------
def test_checked_component_is_the_same_object_and_trains(reg):
    den = reg.create("denoiser", "fakeden")
    assert isinstance(den, FakeDenoiser) and isinstance(den, Denoiser) and isinstance(den, nn.Module)
    assert type(den).__name__ == "FakeDenoiser" and checks.origin(den) == checks.Origin("denoiser", "fakeden", DIST)
    den.extra = 5  # attribute setting goes to the object
    assert den.__dict__["extra"] == 5 and len(list(den.parameters())) == 2
    from reaudio_core.training import torch_module
    assert torch_module(den, "denoiser") is den
    opt = torch.optim.SGD(den.parameters(), lr=0.1)
    before = den.lin.weight.detach().clone()
    x, t, c = torch.randn(2, 2, 4, 3), torch.zeros(2, dtype=torch.long), Conditioning(prompt=torch.zeros(2, 4))
    den.train()
    den(x, t, c).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(before, den.lin.weight)
    for copied in (copy.deepcopy(den), pickle.loads(pickle.dumps(den)), copy.copy(den)):
        assert checks.origin(copied) == checks.origin(den) and isinstance(copied, FakeDenoiser)
        assert torch.equal(copied.lin.weight, den.lin.weight) and copied.extra == 5
        copied.crop = 1
        with raises("denoiser 'fakeden'", "__call__"):
            copied(x, t, c)
    assert checks.unwrap(den) is den and type(den) is FakeDenoiser


def test_checked_module_under_ddp(reg, tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        den = reg.create("denoiser", "fakeden")
        ddp = DistributedDataParallel(den)
        x, t, c = torch.randn(2, 2, 4, 3), torch.zeros(2, dtype=torch.long), Conditioning(prompt=torch.zeros(2, 4))
        ddp(x, t, c).sum().backward()
        assert den.lin.weight.grad is not None
    finally:
        dist.destroy_process_group()


def test_real_components_are_checked_and_round_trip(tmp_path):
    vae = get_registry().create("decoder", "vae", **get_registry().spec("decoder", "vae").tiny)
    assert checks.origin(vae) == checks.Origin("decoder", "vae", "reaudio 0.1.0")
    mel = torch.zeros(1, 16, 64)
    assert vae.decode(vae.encode(mel)).shape == mel.shape
    back = pickle.loads(pickle.dumps(vae))
    assert checks.is_checked(back) and back.decode(back.encode(mel)).shape == mel.shape
    vae.save_pretrained(tmp_path / "vae")
    loaded = get_registry().wrap("decoder", "vae", type(vae).from_pretrained(tmp_path / "vae"))
    assert checks.is_checked(loaded) and loaded.latent_channels == vae.latent_channels


@pytest.mark.slow
def test_overhead_benchmark_runs(tmp_path, capsys):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "checks.py"
    spec = importlib.util.spec_from_file_location("bench_checks", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    try:
        assert bench.main(["--repeats", "1", "--steps", "1", "--threads", "1", "--out", str(tmp_path)]) == 0
    finally:
        checks.set_enabled(True)
    text = (tmp_path / "checks.md").read_text()
    assert "| checks on |" in text and "| checks off (`REAUDIO_CHECKS=0`) |" in text
    assert "| denoiser.__call__ |" in text and "| pipeline conditioning |" in text
