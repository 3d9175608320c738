"""The plugin-author test kit (reaudio_core/testing/): ``reaudio check-plugin DIST`` on third-party packages
written here and pip-installed into a private directory, the pytest helper in a plugin's own suite, and this
repository's suite staying green with a broken third-party plugin installed."""
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO
from reaudio_core.cli import main as cli_main
from reaudio_core.registry import build_registry
from reaudio_core.testing import RULES, check_distribution
from test_plugins import hashtext_site, run_cli  # noqa: F401 (a fixture, used by name)

COMPONENTS = '''
import numpy as np
import torch

from reaudio_core import AudioEncoder, TextEncoder, hookimpl


class CharTextEncoder(TextEncoder):
    """Bag of characters (plus a constant slot, so the empty text has a direction); one state per word."""

    normalise = True

    def __init__(self, *, dim=16):
        self.dim = self.token_dim = dim

    def _check(self, texts):
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be str")

    def embed(self, texts):
        self._check(texts)
        out = torch.zeros(len(texts), self.dim)
        out[:, 0] = 1.0
        for row, text in enumerate(texts):
            for ch in text:
                out[row, 1 + ord(ch) % (self.dim - 1)] += 1.0
        return torch.nn.functional.normalize(out, dim=-1) if self.normalise else out

    def encode_tokens(self, texts, max_tokens=None):
        self._check(texts)
        words = [t.split() for t in texts]
        length = max_tokens if max_tokens is not None else max([len(w) for w in words] + [0])
        states = torch.zeros(len(texts), length, self.token_dim)
        mask = torch.zeros(len(texts), length, dtype=torch.bool)
        for row, ws in enumerate(words):
            for col, word in enumerate(ws[:length]):
                states[row, col, len(word) % self.token_dim] = 1.0
                mask[row, col] = True
        return states, mask


class RawTextEncoder(CharTextEncoder):
    normalise = False  # the contract says L2-normalised rows


class ShortAudioEncoder(AudioEncoder):
    """Declares 32 tokens per clip and returns 7."""

    dim = token_dim = 8
    num_tokens = 32

    def _stats(self, waveforms):
        rows = []
        for w in waveforms:
            w = np.asarray(w, np.float32)
            if w.size == 0:
                raise ValueError("zero-length waveform")
            rows.append([float(np.abs(w).mean()), float(w.std()), 1.0] + [0.0] * 5)
        return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), 8)

    def embed(self, waveforms):
        return torch.nn.functional.normalize(self._stats(waveforms), dim=-1)

    def encode_tokens(self, waveforms):
        tokens = self._stats(waveforms)[:, None, :].repeat(1, 7, 1)
        return tokens, torch.ones(len(waveforms), 7, dtype=torch.bool)
'''

# distribution -> (entry point / module, register call)
PACKAGES = {
    "kit-good": ("kit_good", 'register("text_encoder", "kitgood", CharTextEncoder, defaults={"dim": 16}, tiny={})'),
    "kit-unnormalised": ("kit_raw", 'register("text_encoder", "kitraw", RawTextEncoder, defaults={"dim": 16}, '
                                    'tiny={"dim": 8})'),
    "kit-short-tokens": ("kit_short", 'register("audio_encoder", "kitshort", ShortAudioEncoder, tiny={})'),
    "kit-no-tiny": ("kit_notiny", 'register("text_encoder", "kitnotiny", CharTextEncoder, defaults={"dim": 16})'),
}


@pytest.fixture(scope="module")
def kit_site(tmp_path_factory):
    """The packages above, written as separate distributions and pip-installed into a private directory."""
    root = tmp_path_factory.mktemp("kit-packages")
    for dist, (module, call) in PACKAGES.items():
        pkg = root / dist
        pkg.mkdir()
        (pkg / "pyproject.toml").write_text(textwrap.dedent(f"""\
            [build-system]
            requires = ["setuptools>=61"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "{dist}"
            version = "0.0.1"

            [project.entry-points."reaudio.plugins"]
            {module} = "{module}"

            [tool.setuptools]
            py-modules = ["{module}"]
            """))
        hook = f"\n\n@hookimpl\ndef register_components(register):\n    {call}\n"
        (pkg / f"{module}.py").write_text(COMPONENTS + hook)
    target = tmp_path_factory.mktemp("kit-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), *(str(root / d) for d in PACKAGES)], check=True, timeout=300)
    return target


def check(site, dist):
    return run_cli("check-plugin", dist, env_extra={"PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}, check=False)


def lines(proc, status):
    return [line for line in proc.stdout.splitlines() if line.startswith(status)]


@pytest.mark.slow  # pip-installs plugins (`kit_site`), `reaudio check-plugin` in fresh processes
def test_a_conforming_plugin_passes_every_rule(kit_site):
    proc = check(kit_site, "kit-good")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    passed = lines(proc, "PASS text_encoder kitgood: ")
    assert "PASS text_encoder kitgood: embed rows are L2-normalised" in passed
    assert len(passed) + len(lines(proc, "N/A  text_encoder kitgood: ")) == len(RULES["text_encoder"])
    assert not lines(proc, "FAIL")
    assert "kit-good: 1 component(s)" in proc.stdout and "0 failed" in proc.stdout


@pytest.mark.slow  # `kit_site` and `reaudio check-plugin` in a fresh process
def test_unnormalised_embeddings_fail_the_rule_that_says_so(kit_site):
    proc = check(kit_site, "kit-unnormalised")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failed = lines(proc, "FAIL")
    assert [line.split(" -- ")[0] for line in failed] == ["FAIL text_encoder kitraw: embed rows are L2-normalised"]
    assert "row norms" in failed[0]
    # the other rules still run and pass: the unconditional prompt "" is a unit row even here
    assert 'PASS text_encoder kitraw: embed([""]) is one L2-normalised row (the unconditional prompt)' in proc.stdout
    assert "PASS text_encoder kitraw: embed returns [B, dim] float32" in proc.stdout


@pytest.mark.slow  # `kit_site` and `reaudio check-plugin` in a fresh process
def test_a_wrong_token_count_fails_the_shape_rule(kit_site):
    proc = check(kit_site, "kit-short-tokens")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failed = lines(proc, "FAIL")
    assert len(failed) == 1 and failed[0].startswith(
        "FAIL audio_encoder kitshort: encode_tokens returns tokens [B, num_tokens, token_dim] float32")
    assert "has shape (3, 7, 8), expected (3, 32, 8)" in failed[0]
    assert "PASS audio_encoder kitshort: embed rows are L2-normalised" in proc.stdout


@pytest.mark.slow  # `kit_site` (pip-installs plugins)
def test_a_plugin_without_tiny_parameters_is_told_to_declare_them(kit_site, monkeypatch):
    monkeypatch.syspath_prepend(str(kit_site))  # in process: a registry built now sees the kit packages
    results = check_distribution("kit-no-tiny", registry=build_registry())
    assert [r.line() for r in results] == [
        "FAIL text_encoder kitnotiny: builds from the tiny parameters its plugin declares -- text_encoder 'kitnotiny' "
        "declares no tiny parameters: pass tiny={...} to register() ({} when its defaults are small and offline)"]


def test_a_distribution_that_registers_nothing_is_an_error(capsys):
    assert cli_main(["check-plugin", "no-such-distribution"]) == 2
    err = capsys.readouterr().err
    assert "distribution 'no-such-distribution' registers no reaudio components" in err
    assert "Distributions that do: reaudio" in err


@pytest.mark.slow  # `kit_site` and pytest in a fresh process
def test_the_pytest_helper_fails_a_plugins_suite_and_never_this_one(kit_site, tmp_path):
    """One pytest run over a plugin author's one-line test file and this repository's encoder contract tests,
    with two broken third-party plugins installed: the author's suite fails on the broken rule, this
    repository's lists their components as skipped."""
    (tmp_path / "test_contract.py").write_text("from reaudio_core.testing import contract_tests\n\n"
                                               "test_contract = contract_tests('kit-unnormalised')\n")
    env = {**os.environ, "PYTHONPATH": str(kit_site), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfs", "-p", "no:cacheprovider",
                           str(tmp_path / "test_contract.py"), "tests/test_encoder_contracts.py",
                           "-k", "kitraw or kitshort"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 1, proc.stdout
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and "::test_contract[text_encoder-kitraw-embed-norm]" in failed[0]
    n_text, n_audio = len(RULES["text_encoder"]), len(RULES["audio_encoder"])
    # the author's file: every rule but embed-norm passes, save-load does not apply; this repository's: all skipped
    assert f"1 failed, {n_text - 2} passed, {1 + n_text + n_audio} skipped" in proc.stdout
    assert "text_encoder 'kitraw' comes from kit-unnormalised: `reaudio check-plugin kit-unnormalised` tests it" \
        in proc.stdout
    assert "audio_encoder 'kitshort' comes from kit-short-tokens" in proc.stdout


@pytest.mark.slow  # pip-installs the example plugin, pytest in a fresh process
def test_the_example_plugin_tests_itself_with_the_kit(hashtext_site):
    env = {**os.environ, "PYTHONPATH": str(hashtext_site), "OMP_NUM_THREADS": "1"}
    example = REPO / "examples" / "reaudio-hashtext"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], capture_output=True,
                          text=True, env=env, cwd=example, timeout=300)
    assert proc.returncode == 0, proc.stdout
    assert f"{len(RULES['text_encoder']) - 1} passed, 1 skipped" in proc.stdout  # no save_pretrained: no weights
