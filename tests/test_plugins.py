"""Entry-point discovery end to end: a real third-party package, pip-installed, used by name."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, make_clip


def run_cli(*args, env_extra=None, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", "reaudio_core.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"reaudio {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def hashtext_site(tmp_path_factory):
    """pip-install examples/reaudio-hashtext into a private directory (never into the test env itself)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO / "examples" / "reaudio-hashtext")], check=True, timeout=300)
    return target


@pytest.mark.slow  # pip-installs a plugin (`hashtext_site`), `reaudio plugins` in a fresh process
def test_third_party_plugin_is_listed_with_its_distribution(hashtext_site):
    env = {"PYTHONPATH": f"{hashtext_site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = json.loads(run_cli("plugins", "--json", env_extra=env).stdout)
    comp = {(c["kind"], c["name"]): c for c in out["components"]}
    assert comp[("text_encoder", "hashing")]["distribution"] == "reaudio-hashtext"
    assert comp[("text_encoder", "hashing")]["version"] == "0.1.0"
    assert comp[("text_encoder", "hashing")]["available"]
    text = run_cli("plugins", env_extra=env).stdout
    assert "hashing" in text and "reaudio-hashtext 0.1.0" in text


@pytest.mark.slow  # `reaudio index build` with an installed plugin in a fresh process
def test_third_party_encoder_is_usable_by_name_from_yaml(hashtext_site, tmp_path):
    env = {"PYTHONPATH": f"{hashtext_site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    rows = ["path,caption"]
    for i, (caption, freq) in enumerate([("a dog barking loudly", 300), ("heavy rain on a roof", 900),
                                         ("church bells ringing", 1500)]):
        make_clip(tmp_path / f"c{i}.wav", freq=freq, seed=i)
        rows.append(f"c{i}.wav,{caption}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "variant.yaml").write_text("text_encoder:\n  name: hashing\n  params: {dim: 128}\nretriever: torch\n")
    run_cli("index", "build", "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "db"), "--quiet",
            "--config", str(tmp_path / "variant.yaml"), "database.neighbours=2", env_extra=env)
    hits = json.loads(run_cli("retrieve", "--db", str(tmp_path / "db"), "rain on the roof", "-k", "1", "--json",
                              env_extra=env).stdout)["neighbours"]
    assert hits[0]["caption"] == "heavy rain on a roof"


@pytest.mark.slow  # a published-size model or a subprocess: seconds
def test_plugin_env_var_restricts_loading():
    out = json.loads(run_cli("plugins", "--json", env_extra={"REAUDIO_PLUGINS": "minilm,torch-retriever"}).stdout)
    assert sorted(p["name"] for p in out["plugins"]) == ["minilm", "torch-retriever"]
    faiss = next(c for c in out["components"] if c["name"] == "faiss")
    assert not faiss["available"] and "not enabled" in faiss["error"]


@pytest.mark.slow  # fresh processes with a broken installed plugin
def test_broken_plugin_is_reported_and_the_rest_keeps_working(tmp_path):
    (tmp_path / "broken_reaudio_plugin.py").write_text("raise RuntimeError('kaboom at import')\n")
    dist = tmp_path / "broken_reaudio_plugin-9.9.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-reaudio-plugin\nVersion: 9.9\n")
    (dist / "entry_points.txt").write_text("[reaudio.plugins]\nbroken = broken_reaudio_plugin\n")
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    text = run_cli("plugins", env_extra=env).stdout
    assert "broken (broken-reaudio-plugin 9.9, broken_reaudio_plugin): RuntimeError: kaboom at import" in text
    out = json.loads(run_cli("plugins", "--json", env_extra=env).stdout)
    assert {"minilm", "torch"} <= {c["name"] for c in out["components"] if c["available"]}
