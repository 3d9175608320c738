"""Figures the toolkit writes (matplotlib, headless)."""
from __future__ import annotations

import textwrap
from pathlib import Path

from .io import atomic_write


def save_figure(fig, path: str | Path, dpi: int) -> Path:
    """Write the matplotlib figure ``fig`` to ``path`` atomically (:func:`reaudio_core.io.atomic_write`) in the
    format ``path``'s suffix names (PNG without one), then close it. Returns ``path``."""
    import matplotlib.pyplot as plt
    fmt = Path(path).suffix[1:].lower() or "png"
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=fmt))
    finally:
        plt.close(fig)


def save_mel_png(path: str | Path, mel, title: str, captions: list[str] | None = None) -> None:
    """A log-mel ``[T, 64]`` as an image, titled with the prompt and the retrieved captions."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    mel = np.asarray(mel.detach().cpu() if hasattr(mel, "detach") else mel, dtype=np.float32)
    fig, ax = plt.subplots(figsize=(8, 3.2))
    seconds = mel.shape[0] / 100
    ax.imshow(mel.T, origin="lower", aspect="auto", cmap="magma", extent=(0, seconds, 0, mel.shape[1]))
    ax.set_xlabel("time (s)")
    ax.set_ylabel("mel bin")
    head = textwrap.shorten(title, 80)
    if captions:
        head += "\nretrieved: " + textwrap.shorten("; ".join(captions), 110)
    ax.set_title(head, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
