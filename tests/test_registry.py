"""The catalogue: one source of truth for defaults, every built-in available, clear errors."""
import inspect

import pytest
import yaml

from reaudio_core.config import compose
from reaudio_core.interfaces import BASES
from reaudio_core.registry import ReaudioError, UnknownName, get_registry, registry_path

CATALOGUE = yaml.safe_load(registry_path().read_text())
BUILTIN = [(kind, name) for kind, entries in CATALOGUE["components"].items() for name in entries]


@pytest.mark.parametrize("kind,name", BUILTIN, ids=[f"{k}:{n}" for k, n in BUILTIN])
def test_builtin_component_is_available_and_defaults_live_only_in_registry_yaml(kind, name):
    spec = get_registry().components[(kind, name)]
    assert spec.cls is not None, spec.error
    assert issubclass(spec.cls, BASES[kind])
    assert spec.distribution == "reaudio"
    params = {p.name: p for p in inspect.signature(spec.cls.__init__).parameters.values() if p.name != "self"}
    assert all(p.kind == p.KEYWORD_ONLY for p in params.values()), "constructors take keyword-only arguments"
    with_defaults = [n for n, p in params.items() if p.default is not p.empty]
    assert not with_defaults, f"defaults stated in code as well as registry.yaml: {with_defaults}"
    assert set(params) == set(spec.defaults), "registry.yaml must list exactly the constructor's parameters"


def test_every_plugin_loads():
    failed = {p.name: p.error for p in get_registry().plugins if p.error}
    assert not failed


@pytest.mark.parametrize("preset", sorted(CATALOGUE["presets"]))
def test_presets_compose(preset):
    cfg = compose(preset)
    assert cfg["preset"] == preset


def test_unknown_component_lists_known_with_closest_match():
    with pytest.raises(UnknownName) as err:
        get_registry().spec("retriever", "fais")
    assert "Did you mean 'faiss'" in str(err.value) and "torch" in str(err.value)


def test_unknown_kind_and_parameter():
    with pytest.raises(UnknownName, match="Unknown component kind"):
        get_registry().spec("retreiver", "faiss")
    with pytest.raises(UnknownName, match="no parameter 'efsearch'.*ef_search"):
        get_registry().resolve_params("retriever", "faiss", {"efsearch": 3})


def test_unknown_preset():
    with pytest.raises(UnknownName, match="Unknown preset 'ofline'.*offline"):
        compose("ofline")


def test_unavailable_component_says_why(monkeypatch):
    monkeypatch.setenv("REAUDIO_PLUGINS", "minilm")
    from reaudio_core.registry import build_registry
    reg = build_registry()
    assert reg.names("text_encoder") == ["minilm"]
    with pytest.raises(ReaudioError, match="not installed or not enabled"):
        reg.spec("retriever", "faiss")
