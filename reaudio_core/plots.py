"""Figures the toolkit writes (matplotlib, headless)."""
from __future__ import annotations

import textwrap
from pathlib import Path


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
    fig.savefig(path, dpi=100)
    plt.close(fig)
