"""Shared test setup: offline hub, small synthetic clips, the data location (``$REAUDIO_DATA``, by default
``../shared/data`` beside the checkout)."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import tempfile  # noqa: E402

# the ONNX engine's bundles (reaudio_core/lite): one cache per test session, never the user's
os.environ["REAUDIO_CACHE"] = tempfile.mkdtemp(prefix="reaudio-test-cache-")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import soundfile as sf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("REAUDIO_DATA") or REPO.parent / "shared" / "data")
NO_DATA = f"shared data not found at {SHARED_DATA} (set REAUDIO_DATA)"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data sets (ESC-50 fold 4, Clotho demo, AudioSet ontology, AudioCaps captions). Every test that
    reads them takes this fixture, so without them each skips with the one reason :data:`NO_DATA`."""
    if not SHARED_DATA.is_dir():
        pytest.skip(NO_DATA)
    return SHARED_DATA


@pytest.fixture(autouse=True)
def no_busy_note(request, monkeypatch):
    """In-process CLI calls print no busy-machine note (tests/test_threads.py tests it): what a test expects on
    stderr must not depend on how loaded the machine running it is."""
    if request.module.__name__ != "test_threads":
        from reaudio_core import cli
        monkeypatch.setattr(cli, "_busy_note", lambda: None)


def pytest_terminal_summary(terminalreporter):
    """One line counting the tests that skipped for want of the data (``-rs`` lists them one by one)."""
    n = sum(1 for r in terminalreporter.stats.get("skipped", []) if NO_DATA in str(r.longrepr))
    if n:
        terminalreporter.write_line(f"{n} test(s) skipped: {NO_DATA}")


def make_clip(path: Path, seconds: float = 1.0, sr: int = 16000, freq: float = 440.0, channels: int = 1,
              seed: int = 0) -> Path:
    """Write a short tone-plus-noise clip (tests synthesise audio; none is committed)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    wav = 0.3 * np.sin(2 * np.pi * freq * t) + 0.02 * rng.standard_normal(len(t))
    data = np.repeat(wav[:, None], channels, 1).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, sr)
    return path


@pytest.fixture
def clip_factory(tmp_path):
    def factory(name="clip.wav", **kw):
        return make_clip(tmp_path / name, **kw)
    return factory


def tiny_database(root: Path, settings=()):
    """A three-clip database (a dog, rain, bells) of the tiny preset with ``settings`` overrides, in ``root/db``;
    returns the composed configuration."""
    from reaudio_core.config import compose
    from reaudio_core.database import build_database
    rows = ["path,caption,label"]
    for i, caption in enumerate(["a dog barking", "rain falling on a roof", "church bells ringing"]):
        make_clip(root / f"c{i}.wav", seconds=1.5, freq=200 + 150 * i, seed=i)
        rows.append(f"c{i}.wav,{caption},{caption.split()[1]}")
    (root / "m.csv").write_text("\n".join(rows) + "\n")
    cfg = compose("tiny", [], list(settings))
    build_database([root / "m.csv"], root / "db", cfg, progress=False)
    return cfg


def single_torch_thread():
    """A generator for a module fixture: torch on one intra-op thread inside, restored after (tiny models are as
    fast on one, and far faster on a busy machine)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """The tiny preset's pipeline over a three-clip database (tests/test_batch.py, tests/test_serve.py)."""
    import torch

    from reaudio_core.pipeline import ReAudioPipeline
    root = tmp_path_factory.mktemp("tiny3")
    cfg = tiny_database(root)
    torch.manual_seed(0)
    return ReAudioPipeline.from_config(cfg, db=root / "db")
