"""Shared test setup: offline hub, small synthetic clips, the ../shared/data location."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import soundfile as sf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


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
