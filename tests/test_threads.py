"""--threads N / $REAUDIO_THREADS, and the default that leaves busy cores alone."""
import os

import pytest
import torch

from reaudio_core import cli


@pytest.fixture
def threads_set(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    monkeypatch.delenv("REAUDIO_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    return seen


def test_flag_then_variable_then_torchs_default(threads_set, monkeypatch):
    cli._set_threads(3)
    monkeypatch.setenv("REAUDIO_THREADS", "2")
    cli._set_threads(None)
    cli._set_threads(1)  # the flag wins over the variable
    monkeypatch.delenv("REAUDIO_THREADS")
    cli._set_threads(None)  # neither: torch's default is left alone
    assert threads_set == [3, 2, 1]


def test_the_openmp_wait_policy_is_passive_unless_the_user_set_one():
    """Set before torch starts OpenMP (reaudio_core/__init__.py); a subprocess sees what a user's process sees."""
    import subprocess
    import sys
    code = "import os, reaudio_core; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip() == \
        "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip() == \
        "ACTIVE"


@pytest.mark.parametrize("value", ["abc", "0"])
def test_bad_thread_counts_are_one_line(threads_set, monkeypatch, capsys, tmp_path, value):
    monkeypatch.setenv("REAUDIO_THREADS", value)
    assert cli.main(["generate", "a dog", "-o", str(tmp_path / "x.wav"), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("reaudio: error:") and "thread" in err and "\n" not in err
