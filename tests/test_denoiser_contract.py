"""The Denoiser contract, checked on every registered denoiser at its tiny size (tests/component_factories.py)."""
import pytest
import torch

from component_factories import TINY_PARAMS, tiny
from reaudio_core import Conditioning, ReaudioError, get_registry
from reaudio_core.interfaces import Denoiser

DENOISERS = get_registry().names("denoiser")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def conditioning(den, B, g) -> Conditioning:
    cond = Conditioning(prompt=torch.nn.functional.normalize(torch.randn(B, den.prompt_dim, generator=g), dim=-1))
    if den.text_dim is not None:
        cond.captions = torch.randn(B, 6, den.text_dim, generator=g)
        cond.caption_mask = torch.ones(B, 6, dtype=torch.bool)
        cond.caption_mask[0, 3:] = False
    if den.audio_dim is not None:
        cond.audio = torch.randn(B, 4, den.audio_dim, generator=g)
        cond.audio_mask = torch.ones(B, 4, dtype=torch.bool)
    return cond


def test_every_denoiser_has_a_tiny_instance():
    missing = [n for n in DENOISERS if ("denoiser", n) not in TINY_PARAMS]
    assert not missing, f"add a tiny entry to tests/component_factories.py for {missing}"


@pytest.mark.parametrize("name", DENOISERS)
def test_denoiser_contract(name, tmp_path):
    den = tiny("denoiser", name)
    assert isinstance(den, Denoiser)
    for attr in ("in_channels", "downsample", "prompt_dim"):
        assert isinstance(getattr(den, attr), int) and getattr(den, attr) > 0, attr
    for attr in ("text_dim", "audio_dim"):
        assert getattr(den, attr) is None or getattr(den, attr) > 0
    g = torch.Generator().manual_seed(0)
    B, T, F = 2, 2 * den.downsample, den.downsample
    x = torch.randn(B, den.in_channels, T, F, generator=g)
    t = torch.tensor([5, 900], dtype=torch.int64)
    cond = conditioning(den, B, g)
    with torch.no_grad():
        eps = den(x, t, cond)
        assert eps.shape == x.shape and eps.dtype == torch.float32 and torch.isfinite(eps).all()
        assert torch.equal(den(x, t, cond), eps), "not deterministic"
        one = den(x[:1], t[:1], Conditioning(*(None if v is None else v[:1] for v in vars(cond).values())))
        assert torch.allclose(one, eps[:1], atol=1e-5), "batch rows are not independent"
        assert not torch.allclose(den(x, t.flip(0), cond), eps), "timesteps ignored"
        other = Conditioning(**{**vars(cond), "prompt": -cond.prompt})
        assert not torch.allclose(den(x, t, other), eps), "prompt embedding ignored"
        both = cond.cat(cond)  # the batched classifier-free guidance layout
        assert torch.allclose(den(torch.cat([x, x]), torch.cat([t, t]), both)[:B], eps, atol=1e-5)
    with pytest.raises(ReaudioError):
        den(x[:, :, : T - 1], t, cond)  # not a multiple of the downsampling
    if hasattr(den, "save_pretrained"):
        den.save_pretrained(tmp_path / name)
        back = type(den).from_pretrained(tmp_path / name)
        with torch.no_grad():
            assert torch.equal(back(x, t, cond), eps)
