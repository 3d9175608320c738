"""Denoiser ``experts`` (plugins/experts.py): each batch row goes to the expert of its timestep, the pair
saves and loads as one directory (also as a pipeline's denoiser/), and mismatched experts are refused."""
import json

import pytest
import torch

from component_factories import TINY_PARAMS
from reaudio_core import Conditioning, ReaudioError, create

UNET = TINY_PARAMS[("denoiser", "unet-ldm")]


def pair(boundary=400, **low):
    torch.manual_seed(0)
    return create("denoiser", "experts", boundary=boundary, high={"name": "unet-ldm", "params": UNET},
                  low={"name": "unet-ldm", "params": {**UNET, **low}})


def batch(t):
    g = torch.Generator().manual_seed(1)
    B = len(t)
    cond = Conditioning(prompt=torch.randn(B, 16, generator=g), captions=torch.randn(B, 5, 24, generator=g),
                        caption_mask=torch.ones(B, 5, dtype=torch.bool), audio=torch.randn(B, 4, 20, generator=g),
                        audio_mask=torch.ones(B, 4, dtype=torch.bool))
    return torch.randn(B, 8, 16, 8, generator=g), torch.tensor(t), cond


def test_rows_go_to_the_expert_of_their_timestep():
    den = pair(boundary=400)
    x, t, cond = batch([0, 399, 400, 999])
    with torch.no_grad():
        out = den(x, t, cond)
        low, high = den.low(x, t, cond), den.high(x, t, cond)
    assert not torch.allclose(low, high)  # two different networks
    assert torch.allclose(out[:2], low[:2], atol=1e-5) and torch.allclose(out[2:], high[2:], atol=1e-5)
    with torch.no_grad():  # all rows on one side: that expert alone
        assert torch.equal(den(x[:2], t[:2], cond.rows(slice(0, 2))), den.low(x[:2], t[:2], cond.rows(slice(0, 2))))


def test_save_and_load_round_trip(tmp_path):
    den = pair(boundary=250)
    den.save_pretrained(tmp_path / "d")
    assert json.loads((tmp_path / "d" / "config.json").read_text()) == {"boundary": 250, "high": "unet-ldm",
                                                                        "low": "unet-ldm"}
    back = type(den).from_pretrained(tmp_path / "d")
    assert back.boundary == 250 and back.params == den.params
    x, t, cond = batch([10, 600])
    with torch.no_grad():
        assert torch.allclose(back(x, t, cond), den(x, t, cond), atol=1e-6)
    # through the registry's checkpoint parameter: the directory's boundary wins over the default
    again = create("denoiser", "experts", checkpoint=str(tmp_path / "d"))
    assert again.boundary == 250
    with pytest.raises(ReaudioError, match="not an experts directory"):
        create("denoiser", "experts", checkpoint=str(tmp_path / "d" / "high"))


def test_mismatched_experts_and_bad_boundaries_are_refused():
    with pytest.raises(ReaudioError, match="audio_dim"):
        pair(audio_dim=12)
    for bad in (0, 1000, 400.0, True):
        with pytest.raises(ReaudioError, match="boundary"):
            pair(boundary=bad)
    with pytest.raises(ReaudioError, match="cannot itself be 'experts'"):
        create("denoiser", "experts", high={"name": "experts"}, low={"name": "unet-ldm", "params": UNET})


def test_the_pair_trains_as_one_module_each_expert_on_its_own_timesteps():
    """`reaudio distill` trains both experts at once: their torch modules are one ModuleDict, and a row's loss
    reaches only the expert of its timestep."""
    from reaudio_core.training import torch_module
    d = pair()
    module = torch_module(d, "denoiser")
    assert set(module) == {"high", "low"} and module["high"] is d.high.model and module["low"] is d.low.model
    from types import SimpleNamespace

    from reaudio_core.training import Stage  # under DDP a part may get no gradient in a step: DDP is told so
    assert Stage.routes_rows.fget(SimpleNamespace(denoiser=d))
    assert not Stage.routes_rows.fget(SimpleNamespace(denoiser=d.high))
    x, t, cond = batch([900, 950])  # both rows above the boundary
    d(x, t, cond).square().mean().backward()
    assert all(p.grad is None for p in d.low.model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.high.model.parameters())
    with pytest.raises(ReaudioError, match="guidance scale as an input"):
        create("denoiser", "experts", high={"name": "unet-ldm", "params": {**UNET, "guidance_embedding": 8}},
               low={"name": "unet-ldm", "params": UNET})
