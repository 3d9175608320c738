"""Install routes: a built wheel runs from any directory; a missing optional module is one line."""
import os
import shutil
import site
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import REPO
from reaudio_core import ReaudioError
from reaudio_core.cli import main
from reaudio_core.optional import require
from reaudio_core.registry import build_registry, create, registry_path


def test_require_returns_the_module_or_one_line_naming_the_extra(monkeypatch):
    import json
    assert require("json", None, "anything") is json
    monkeypatch.setitem(sys.modules, "laion_clap", None)  # as if laion-clap were not installed
    with pytest.raises(ReaudioError) as err:
        require("laion_clap", "laion", "clap backend 'laion'", "laion-clap", alternative="use backend=transformers")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("clap backend 'laion' needs laion-clap (")
    assert msg.endswith(': pip install "reaudio[laion]"; or use backend=transformers')
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ReaudioError, match=r"^x needs timm \(.*\): pip install timm \(a dependency of reaudio\)$"):
        require("timm", None, "x")


def test_clap_laion_backend_without_laion_clap_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "laion_clap", None)
    with pytest.raises(ReaudioError, match=r'^clap backend .laion. needs laion-clap .*pip install "reaudio\[laion\]"'):
        create("audio_encoder", "clap", backend="laion", pretrained="unused.pt")


@pytest.fixture
def without_timm(monkeypatch):
    """As if timm were not installed, and no AudioMAE built earlier in this process."""
    from reaudio_plugins import _encoders
    monkeypatch.setitem(sys.modules, "timm.models.vision_transformer", None)
    monkeypatch.setattr(_encoders, "_SHARED", weakref.WeakValueDictionary())


def test_audiomae_without_timm_names_the_package(without_timm):
    with pytest.raises(ReaudioError, match=r"^the audiomae audio encoder needs timm \(.*\): pip install timm"):
        create("audio_encoder", "audiomae", pretrained=None, random_init=True, size="tiny")


@pytest.mark.slow  # builds the tiny pipeline's other stages first (about 10 s)
def test_tiny_preset_without_timm_is_one_line_not_a_traceback(without_timm, monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("REAUDIO_TRACEBACK", raising=False)
    rc = main(["generate", "a dog barks", "--preset", "tiny", "-o", str(tmp_path / "x.wav")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1, err
    assert "the audiomae audio encoder needs timm" in err and "pip install timm" in err
    assert not (tmp_path / "x.wav").exists()


def test_plugin_whose_dependency_is_missing_is_listed_and_building_it_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    monkeypatch.delitem(sys.modules, "reaudio_plugins.faiss_retriever", raising=False)  # import it afresh
    reg = build_registry()
    info = next(p for p in reg.plugins if p.name == "faiss")
    assert info.error and "pip install faiss-cpu" in info.error
    with pytest.raises(ReaudioError) as err:
        reg.create("retriever", "faiss")
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("retriever 'faiss' is unavailable: plugin 'faiss' failed to load")
    assert reg.create("retriever", "torch") is not None  # the other plugins still load


def test_registry_is_found_inside_the_package_from_any_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("REAUDIO_REGISTRY", raising=False)
    monkeypatch.chdir(tmp_path)
    path = registry_path()
    assert path.parent == REPO / "reaudio_core"
    assert path.read_bytes() == (REPO / "registry.yaml").read_bytes()  # one catalogue, shipped from the package


# -- the wheel ----------------------------------------------------------------------------------------------
SOURCES = ("pyproject.toml", "README.md", "registry.yaml", "reaudio_core", "plugins")

DRIVER = """\
import sys
import reaudio_core, reaudio_plugins
from reaudio_core.pipeline import resolve_path
from reaudio_core.registry import registry_path
print("reaudio_core:", reaudio_core.__file__)
print("reaudio_plugins:", reaudio_plugins.__file__)
print("registry:", registry_path())
print("model:", resolve_path("pkg:reaudio_plugins/weights/offline"))
from reaudio_core.cli import main
sys.exit(main())
"""


def third_party_paths() -> list[str]:
    """site-packages directories of this interpreter (the installed dependencies). Used with
    ``python -S``: no .pth file is processed, so an editable reaudio install there stays invisible."""
    dirs = site.getsitepackages() + [site.getusersitepackages()]
    return [d for d in dirs if Path(d).is_dir() and Path(d).resolve() != REPO]


@pytest.mark.slow
def test_wheel_installs_and_generates_from_another_directory(tmp_path):
    src = tmp_path / "src"  # a clean copy: no stale build/ of the checkout can leak into the wheel
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run(pip + ["wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
                          str(src)], check=True, timeout=300, capture_output=True)
    wheel, = (tmp_path / "dist").glob("reaudio-*.whl")
    target = tmp_path / "target"
    subprocess.run(pip + ["install", "-q", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                   check=True, timeout=300, capture_output=True)
    assert (target / "reaudio_core" / "registry.yaml").is_file()
    assert not (target / "reaudio_core" / "registry.yaml").is_symlink()
    assert (target / "reaudio_plugins" / "weights" / "offline" / "denoiser" / "high" / "model.safetensors").is_file()

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(target)] + third_party_paths())}
    for key in ("REAUDIO_REGISTRY", "REAUDIO_PLUGINS"):
        env.pop(key, None)

    def run(*args, rc=0):
        proc = subprocess.run([sys.executable, "-S", *args], cwd=work, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == rc, f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout if rc == 0 else proc.stderr

    listing = run(str(target / "bin" / "reaudio"), "plugins")  # the installed console script
    assert "unavailable" not in listing and "failed to load" not in listing, listing
    assert "offline" in listing.splitlines()[-1]
    # benchmarks/ is not packaged: one line saying so, not a traceback
    err = run(str(target / "bin" / "reaudio"), "bench", "retrievers", rc=2)
    assert err.count("\n") == 1 and "source checkout" in err, err

    out = run("-c", DRIVER, "generate", "a dog barks", "-o", "x.wav")
    report = dict(line.split(": ", 1) for line in out.splitlines() if line.split(": ", 1)[0]
                  in ("reaudio_core", "reaudio_plugins", "registry", "model"))
    for key in ("reaudio_core", "reaudio_plugins", "registry", "model"):
        assert Path(report[key]).is_relative_to(target), (key, report[key])
    wav, sr = sf.read(str(work / "x.wav"))
    assert sr == 16000
    assert len(wav) > sr  # the offline preset's 5.12 s
    assert float(np.sqrt(np.mean(np.square(wav)))) > 1e-3


def test_every_subpackage_of_the_core_ships_in_the_wheel():
    """pyproject lists packages explicitly (plugins/ installs as reaudio_plugins): a new subpackage of reaudio_core
    that is not listed would be missing from a wheel while an editable install hides it."""
    import tomllib
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "reaudio_core").rglob("__init__.py")}
    assert found - listed == set(), f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
