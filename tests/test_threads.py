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
    cli._set_threads(None, computes=True)  # neither: torch's default stays (the output's bits depend on it)
    assert threads_set == [3, 2, 1]


def test_a_busy_machine_gets_a_note_naming_the_flag(threads_set, monkeypatch, capsys):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (2.2, 0, 0))  # other jobs hold every core
    cli._set_threads(None, computes=True)
    assert "--threads 1 (or REAUDIO_THREADS=1)" in capsys.readouterr().err
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 0, 0))  # e.g. what an install just left: no note
    cli._set_threads(None, computes=True)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0, 0))  # idle: nothing to say
    cli._set_threads(None, computes=True)
    assert capsys.readouterr().err == "" and threads_set == []


def test_omp_num_threads_is_left_to_torch(threads_set, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 0, 0))
    cli._set_threads(None, computes=True)
    assert threads_set == [] and capsys.readouterr().err == ""


@pytest.mark.parametrize("value", ["abc", "0"])
def test_bad_thread_counts_are_one_line(threads_set, monkeypatch, capsys, tmp_path, value):
    monkeypatch.setenv("REAUDIO_THREADS", value)
    assert cli.main(["generate", "a dog", "-o", str(tmp_path / "x.wav"), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("reaudio: error:") and "thread" in err and "\n" not in err


@pytest.mark.parametrize("batch", [False, True])
def test_generate_applies_the_thread_flag_once_it_knows_its_engine(threads_set, tmp_path, batch):
    """`reaudio generate` leaves torch alone until it has planned its engine (the ONNX engine imports no torch),
    then applies --threads for a torch run, one-shot and batch alike."""
    out = ["-o", str(tmp_path / ("out" if batch else "x.wav"))]
    if batch:
        (tmp_path / "p.txt").write_text("a dog\n")
        out = ["--prompts", str(tmp_path / "p.txt"), *out]
    else:
        out = ["a dog", *out]
    assert cli.main(["generate", *out, "--preset", "tiny", "--threads", "1", "generation.retrieval=none"]) == 0
    assert threads_set == [1]
