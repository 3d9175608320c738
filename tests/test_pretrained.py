"""The Pretrained mixin: one save/load path for every component with weights."""
import json

import pytest
import torch

from reaudio_core import Pretrained, ReaudioError, get_registry
from reaudio_core.pretrained import CONFIG_FILE, WEIGHTS_FILE, read_json


class Toy(Pretrained):
    """A minimal component: a Linear layer whose weights load from ``checkpoint`` when given."""

    def __init__(self, *, width, scale, checkpoint=None):
        self.width, self.scale = width, scale
        torch.manual_seed(width)
        self.layer = torch.nn.Linear(width, width)
        if checkpoint:
            from safetensors.torch import load_file
            self.layer.load_state_dict(load_file(f"{checkpoint}/{WEIGHTS_FILE}"))

    def _config(self):
        return {"width": self.width, "scale": self.scale, "checkpoint": None}

    def _state_dict(self):
        return self.layer.state_dict()


class ToyWithExtra(Toy):
    def _save_extra(self, directory):
        (directory / "notes.txt").write_text("extra")


def test_round_trip_layout_and_overrides(tmp_path):
    toy = Toy(width=3, scale=0.5)
    with torch.no_grad():
        toy.layer.weight.add_(1.0)  # differs from a fresh Toy(width=3)
    toy.save_pretrained(tmp_path / "toy")
    assert sorted(p.name for p in (tmp_path / "toy").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert read_json(tmp_path / "toy" / CONFIG_FILE) == {"width": 3, "scale": 0.5, "checkpoint": None}
    again = Toy.from_pretrained(tmp_path / "toy", scale=2.0)
    assert again.scale == 2.0 and again.width == 3
    assert torch.equal(again.layer.weight, toy.layer.weight)


def test_save_replaces_the_folder_and_writes_extras(tmp_path):
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "stale.bin").write_bytes(b"old")
    ToyWithExtra(width=2, scale=1.0).save_pretrained(tmp_path / "toy")
    assert sorted(p.name for p in (tmp_path / "toy").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE, "notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["toy"]  # no temporary folder left behind


def test_failed_save_leaves_the_previous_folder(tmp_path):
    Toy(width=2, scale=1.0).save_pretrained(tmp_path / "toy")
    before = (tmp_path / "toy" / CONFIG_FILE).read_bytes()

    class Broken(Toy):
        def _save_extra(self, directory):
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        Broken(width=4, scale=9.0).save_pretrained(tmp_path / "toy")
    assert (tmp_path / "toy" / CONFIG_FILE).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["toy"]


def test_missing_config_is_one_actionable_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReaudioError, match="re-save the component"):
        Toy.from_pretrained(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / CONFIG_FILE).write_text(json.dumps([1, 2]))
    with pytest.raises(ReaudioError, match="expected a JSON object"):
        Toy.from_pretrained(tmp_path / "bad")


def test_every_registered_component_with_weights_is_pretrained():
    reg = get_registry()
    saving = {key: spec.cls for key, spec in reg.components.items() if hasattr(spec.cls, "save_pretrained")}
    assert ("decoder", "vae") in saving and ("text_encoder", "t5") in saving
    assert [key for key, cls in saving.items() if not issubclass(cls, Pretrained)] == []


def test_kit_round_trip_rule_needs_the_mixin(tmp_path):
    """check-plugin's save-load rule tests a Pretrained component, refuses a hand-written save_pretrained
    (a pipeline would not save it) and does not apply to a component without weights."""
    from types import SimpleNamespace

    from reaudio_core.testing import NotApplicable, _round_trip

    class HandWritten:
        def save_pretrained(self, directory):
            pass

    def outputs(component):
        return component.layer.weight.detach().clone()
    _round_trip(SimpleNamespace(component=Toy(width=2, scale=1.0), tmp=tmp_path), outputs)
    with pytest.raises(AssertionError, match="does not subclass reaudio_core.Pretrained"):
        _round_trip(SimpleNamespace(component=HandWritten(), tmp=tmp_path), outputs)
    with pytest.raises(NotApplicable):
        _round_trip(SimpleNamespace(component=object(), tmp=tmp_path), outputs)


def test_saved_folder_has_plain_mkdir_permissions(tmp_path):
    import os
    import stat
    (tmp_path / "plain").mkdir()
    Toy(width=2, scale=1.0).save_pretrained(tmp_path / "toy")
    mode = stat.S_IMODE(os.stat(tmp_path / "toy").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)
