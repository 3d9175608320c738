"""Long clips: a ``duration`` beyond ``generation.max_duration`` as overlapping windows of ``generation.window``
seconds (null = ``max_duration``; the offline preset: 5.12 s, the length it was trained on).

Each window's last ``generation.window_trim`` seconds are dropped: a model trained on clips padded at the end
(the offline preset: 5 s ESC-50 clips in 5.12 s crops) ends every clip in that silence, which would otherwise
become a gap at each seam. Window 0 is an ordinary generation. Each later window starts ``window - window_trim -
overlap`` seconds after the previous one and is an outpainting of it: its first ``generation.overlap`` seconds
are the previous window's last kept latent frames, kept as inpainting keeps the unmasked input
(:func:`reaudio_core.modes.blend`), the rest generated. Each window is decoded to a log-mel and joined to the clip
so far with a linear crossfade over the overlap; the joined log-mel is cut to the duration and vocoded once. The windows share the prompt's conditions and the
candidates' generators (which draw fresh noise per window).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import mel as M
from .registry import ReaudioError

MAX_SECONDS = 600.0  #: the longest clip (a bigger number is a typing error more often than a wish)


@dataclass
class Windows:
    frames: int  #: mel frames of the whole clip
    window: float  #: seconds per window
    window_frames: int
    overlap_frames: int  #: mel frames shared by consecutive windows
    compression: int  #: mel frames per latent frame
    trim_frames: int = 0  #: mel frames dropped at the end of each window

    @property
    def used(self) -> int:
        """Mel frames of each window that the clip uses."""
        return self.window_frames - self.trim_frames

    @property
    def hop(self) -> int:
        return self.used - self.overlap_frames

    @property
    def count(self) -> int:
        return 1 + max(0, -(-(self.frames - self.used) // self.hop))

    @property
    def record(self) -> dict:
        """What ran: the window and overlap and each window's span in the clip, in seconds."""
        spans = [[M.frames_to_seconds(i * self.hop), M.frames_to_seconds(min(i * self.hop + self.used, self.frames))]
                 for i in range(self.count)]
        return {"window": self.window, "overlap": M.frames_to_seconds(self.overlap_frames),
                "window_trim": M.frames_to_seconds(self.trim_frames), "windows": spans}

    @property
    def note(self) -> str:
        spans = ", ".join(f"{a:g}-{b:g}" for a, b in self.record["windows"])
        return (f"long clip: {self.count} windows of {self.window:g} s overlapping by "
                f"{M.frames_to_seconds(self.overlap_frames):g} s (generation.window / overlap): {spans} s")

    def sample(self, pipe, cond, uncond, shape, generators, steps, guidance, sampler, eta, progress,
               guidance_rescale: float = 0.0) -> torch.Tensor:
        """``[B, frames, 64]`` log-mel of the whole clip (module docstring)."""
        lat, end = self.overlap_frames // self.compression, self.used // self.compression
        keep = torch.zeros(1, 1, shape[1], 1)
        keep[:, :, :lat] = 1
        latents = mels = None
        for _ in tqdm(range(self.count), desc="windows", disable=not progress, leave=False):
            known = None
            if latents is not None:  # outpainting: the previous window's tail is this one's head
                known = torch.zeros_like(latents)
                known[:, :, :lat] = latents[:, :, end - lat:end]
            latents = pipe.sample(cond, uncond, shape, generators, steps, guidance, sampler, eta, False,
                                  guidance_rescale=guidance_rescale, known=known,
                                  keep=keep if known is not None else None)
            mel = pipe.decoder.decode(latents)[:, :self.used]
            mels = mel if mels is None else crossfade(mels, mel, self.overlap_frames)
        return mels[:, :self.frames]


def crossfade(head: torch.Tensor, tail: torch.Tensor, overlap: int) -> torch.Tensor:
    """``head`` then ``tail`` (``[B, T, 64]``), the last ``overlap`` frames of ``head`` faded linearly into the
    first ``overlap`` of ``tail``."""
    w = torch.linspace(0, 1, overlap + 2, dtype=head.dtype)[1:-1].reshape(1, -1, 1)
    mixed = (1 - w) * head[:, -overlap:] + w * tail[:, :overlap]
    return torch.cat([head[:, :-overlap], mixed, tail[:, overlap:]], dim=1)


def plan(pipe, duration: float) -> Windows:
    """The windows of a clip of ``duration`` seconds; a bad window, overlap or duration is one error line."""
    gen = pipe.cfg["generation"]
    if duration > MAX_SECONDS:
        raise ReaudioError(f"duration {duration} s is beyond the longest clip, {MAX_SECONDS:g} s")
    frames = M.seconds_to_frames(duration)
    window = float(gen.get("window") or gen["max_duration"])
    if window > gen["max_duration"]:
        raise ReaudioError(f"generation.window={window} s is beyond the model's limit of {gen['max_duration']} s")
    shape = pipe.latent_shape(window)  # a valid single-generation length
    overlap, comp = gen.get("overlap"), pipe.decoder.compression
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 < overlap < window:
        raise ReaudioError(f"generation.overlap must be a number of seconds between 0 and the window ({window} s), "
                           f"got {overlap!r}")
    lap = M.seconds_to_frames(overlap, exact=False)
    trim = M.seconds_to_frames(gen["window_trim"], exact=False) if gen.get("window_trim") else 0
    if trim % comp or trim + lap >= shape[1] * comp:
        raise ReaudioError(f"generation.window_trim={gen.get('window_trim')} s must be a multiple of "
                           f"{M.frames_to_seconds(comp):g} s, and with the overlap shorter than the window")
    if lap % comp or lap < comp:
        good = max(comp, lap // comp * comp)
        raise ReaudioError(f"generation.overlap={overlap} s is {lap} mel frames, not a positive multiple of the "
                           f"decoder's {comp}; try {M.frames_to_seconds(good):g} s")
    return Windows(frames, window, shape[1] * comp, lap, comp, trim)
