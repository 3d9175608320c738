"""Text-to-audio from a bundle (:mod:`.export`) with ONNX Runtime and numpy: no torch, transformers or diffusers.

The same generation as :class:`~reaudio_core.pipeline.ReAudioPipeline` for the plain text-to-audio case, read top to
bottom in :meth:`Lite.__call__`: prompt -> minilm embedding (``tokenizers`` + ``text.onnx``, mask-mean, L2) ->
top-k database items (the database's own retriever plugin and index) -> their cached caption states and audio
tokens, side by side -> DDIM on the trailing grid (deterministic, diffusers' ``DDIMScheduler`` arithmetic) with one
guided call per step (a guidance-distilled denoiser) or the batched unconditional half -> ``decoder.onnx`` ->
Griffin-Lim (:mod:`.griffinlim`). One difference: the initial noise comes from numpy's PCG64 seeded with the seed,
not torch's generator, so a seed gives other audio than on the torch engine (the saved configuration records the
engine).
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import numpy as np

from .. import timings
from ..generate import latent_shape
from ..registry import ReaudioError
from .griffinlim import griffin_lim

FORMAT = 1


def _session(path: Path, threads: int | None):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads must not spin
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def trailing_timesteps(steps: int, train_steps: int) -> np.ndarray:
    """diffusers' ``timestep_spacing="trailing"``: ``round(arange(T, 0, -T/steps)) - 1``."""
    return (np.round(np.arange(train_steps, 0, -train_steps / steps)).astype(np.int64) - 1)


def alphas_cumprod(d: dict) -> np.ndarray:
    """The training noise schedule (reference section 5; ``scaled_linear`` or ``linear`` betas), float32."""
    T = int(d["num_train_timesteps"])
    if d["beta_schedule"] == "scaled_linear":
        betas = np.linspace(d["beta_start"] ** 0.5, d["beta_end"] ** 0.5, T, dtype=np.float32) ** 2
    elif d["beta_schedule"] == "linear":
        betas = np.linspace(d["beta_start"], d["beta_end"], T, dtype=np.float32)
    else:
        raise ReaudioError(f"the ONNX engine has no beta_schedule {d['beta_schedule']!r}")
    return np.cumprod(1.0 - betas.astype(np.float32), dtype=np.float32)


class Lite:
    """A bundle opened for generation (``threads``: ONNX Runtime's intra-op threads; None = its default)."""

    def __init__(self, bundle: str | Path, threads: int | None = None):
        from tokenizers import Tokenizer
        self.dir = Path(bundle)
        m = json.loads((self.dir / "manifest.json").read_text(encoding="utf-8"))
        if m.get("format") != FORMAT:
            raise ReaudioError(f"{self.dir}: bundle format {m.get('format')} (this reaudio reads {FORMAT}); re-export it")
        self.m, self.cfg = m, m["config"]
        self.tokenizer = Tokenizer.from_file(str(self.dir / m["text"]["tokenizer"]))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(int(m["text"]["max_length"]))
        self.text = _session(self.dir / m["text"]["graph"], threads)
        names = sorted({r[2] for r in m["denoiser"]["routes"]})
        self.graphs = {n: _session(self.dir / n, threads) for n in names}
        self.decoder = _session(self.dir / m["decoder"]["graph"], threads)
        with np.load(self.dir / "arrays.npz") as a:
            self.arrays = {k: a[k] for k in a.files}
        self.alphas = alphas_cumprod(m["diffusion"])
        self.items, self.index, self.features = [], None, {}
        if m["database"]:
            self._open_database(m["database"])

    def _open_database(self, db: dict) -> None:
        vdir = Path(db["version_dir"])
        if not vdir.is_dir():
            raise ReaudioError(f"the bundle's database {vdir} is gone; re-export (delete {self.dir})")
        cls = importlib.import_module(db["module"])
        for part in db["cls"].split("."):
            cls = getattr(cls, part)
        self.index = cls.load(vdir / "index", **db["params"])
        with open(vdir / "items.jsonl", encoding="utf-8") as f:
            self.items = [json.loads(line) for line in f if line.strip()]
        if len(self.items) != db["size"]:
            raise ReaudioError(f"{vdir} changed since the bundle was exported; re-export (delete {self.dir})")
        for stream, name in db["features"].items():
            d = vdir / "features" / name
            self.features[stream] = (np.load(d / "states.npy", mmap_mode="r"), np.load(d / "mask.npy", mmap_mode="r"))

    # -- the steps -------------------------------------------------------------------------------------
    def _states(self, texts: list[str], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(last hidden states [n, L, d], attention mask [n, L] int64)``: padded to the longest, or to ``length``
        and truncated there (the minilm plugin's tokenizer call)."""
        tok = self.tokenizer
        if length:
            tok.enable_padding(length=length, pad_id=tok.token_to_id("[PAD]") or 0, pad_token="[PAD]")
            tok.enable_truncation(length)
        else:
            tok.enable_padding(pad_id=tok.token_to_id("[PAD]") or 0, pad_token="[PAD]")
            tok.enable_truncation(int(self.m["text"]["max_length"]))
        encs = tok.encode_batch(texts)
        feed = {"input_ids": np.array([e.ids for e in encs], np.int64),
                "attention_mask": np.array([e.attention_mask for e in encs], np.int64),
                "token_type_ids": np.array([e.type_ids for e in encs], np.int64)}
        used = {i.name for i in self.text.get_inputs()}
        return self.text.run(None, {k: v for k, v in feed.items() if k in used})[0], feed["attention_mask"]

    def embed(self, prompt: str) -> np.ndarray:
        """``[1, d]`` float32: mask-mean of the last hidden states, L2-normalised (the minilm plugin's recipe)."""
        states, mask = self._states([prompt])
        m = mask[..., None].astype(np.float32)
        pooled = (states * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        return (pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)).astype(np.float32)

    def caption_states(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``([n, caption_tokens, d] with padding zeroed, [n, caption_tokens] bool)``: the caption encoder's
        ``encode_tokens`` (the same minilm as the prompt's)."""
        states, mask = self._states(captions, int(self.cfg["generation"]["caption_tokens"]))
        return (states * mask[..., None]).astype(np.float32), mask.astype(bool)

    def retrieve(self, query: np.ndarray, k: int) -> list[dict]:
        scores, ids = self.index.search(query, k)
        return [{**self.items[int(i)], "id": int(i), "score": float(s)} for s, i in zip(scores[0], ids[0]) if i >= 0]

    def condition(self, prompt: str, k: int) -> tuple[dict, dict, list[dict]]:
        """(conditional, unconditional inputs by name, neighbours), as ``ReAudioPipeline.condition`` builds them."""
        gen, a = self.cfg["generation"], self.arrays
        query = self.embed(prompt)
        neighbours = self.retrieve(query, k) if gen["retrieval"] != "none" else []
        uncond = {"prompt": a["uncond_prompt"]}
        L = int(gen["caption_tokens"])
        if "uncond_captions" in a:
            uncond["captions"] = np.tile(a["uncond_captions"][:, :L], (1, k, 1))
            uncond["caption_mask"] = np.ones(uncond["captions"].shape[:2], bool)
        if "uncond_audio" in a:
            n = a["uncond_audio"].shape[1] // int(self.m["export_k"])
            uncond["audio"] = np.zeros((1, k * n, a["uncond_audio"].shape[2]), np.float32)
            uncond["audio_mask"] = np.ones(uncond["audio"].shape[:2], bool)
        cond = {"prompt": query}
        ids = [nb["id"] for nb in neighbours]
        for stream, key, mask_key, wanted in (("caption", "captions", "caption_mask", ("text", "audio+text")),
                                              ("audio", "audio", "audio_mask", ("audio", "audio+text"))):
            if key not in uncond:
                continue
            if gen["retrieval"] in wanted:  # k neighbours side by side: [1, k*L, d], [1, k*L]
                if stream in self.features:  # the database's cache
                    table, masks = self.features[stream]
                    states, mask = np.stack([table[i] for i in ids]), np.stack([masks[i] for i in ids])
                else:  # captions through the text graph (export checks the caption encoder is the prompt's)
                    states, mask = self.caption_states([nb["caption"] for nb in neighbours])
                cond[key] = states.astype(np.float32).reshape(1, -1, states.shape[-1])
                cond[mask_key] = mask.astype(bool).reshape(1, -1)
            else:  # a stream not retrieved gets its unconditional input
                cond[key], cond[mask_key] = uncond[key], uncond[mask_key]
        return cond, uncond, neighbours

    def denoise(self, x: np.ndarray, t: int, inputs: dict) -> np.ndarray:
        graph = next(g for lo, hi, g in self.m["denoiser"]["routes"] if lo <= t <= hi)
        session = self.graphs[graph]
        feed = {"latents": x, "timesteps": np.full((len(x),), t, np.int64), **inputs}
        return session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})[0]

    def sample(self, cond: dict, uncond: dict, shape, seed: int, steps: int, guidance: float) -> np.ndarray:
        """DDIM (eta 0) on the trailing grid, to alpha 1 at the end (``ddim-trailing``)."""
        T = int(self.m["diffusion"]["num_train_timesteps"])
        v_pred = self.m["diffusion"]["prediction_type"] == "v_prediction"
        one_call = self.m["denoiser"]["guidance_input"]
        guided = guidance != 1.0 and not one_call
        present = self.m["denoiser"]["inputs"]
        if one_call:
            inputs = {**{f: cond[f] for f in present if f != "guidance"}, "guidance": np.full((1,), guidance, np.float32)}
        elif guided:
            inputs = {f: np.concatenate([uncond[f], cond[f]]) for f in present}
        else:
            inputs = {f: cond[f] for f in present}
        latents = np.random.default_rng(seed).standard_normal((1, *shape), dtype=np.float32)
        for t in trailing_timesteps(steps, T):
            x = np.concatenate([latents, latents]) if guided else latents
            out = self.denoise(x, int(t), inputs)
            if guided:
                out_u, out_c = out[:1], out[1:]
                out = out_u + np.float32(guidance) * (out_c - out_u)
            a = self.alphas[t]
            prev = t - T // steps
            a_prev = self.alphas[prev] if prev >= 0 else np.float32(1.0)
            if v_pred:
                x0 = a ** 0.5 * latents - (1 - a) ** 0.5 * out
                eps = a ** 0.5 * out + (1 - a) ** 0.5 * latents
            else:
                eps = out
                x0 = (latents - (1 - a) ** 0.5 * eps) / a ** 0.5
            latents = (a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps).astype(np.float32)
            if not np.isfinite(latents).all():
                raise ReaudioError(f"non-finite latents at timestep {t}: lower the guidance scale or check the weights")
        return latents

    def latent_shape(self, duration: float) -> tuple[int, int, int]:
        dec, den = self.m["decoder"], self.m["denoiser"]
        return latent_shape(duration, self.cfg["generation"]["max_duration"], dec["latent_channels"],
                            dec["compression"], den["downsample"], dec["mel_fps"])

    def __call__(self, prompt: str, *, seed: int, steps: int, guidance: float, duration: float, k: int):
        """``(waveform [samples] float32 at 16 kHz, log-mel [T, 64], neighbours)`` for one prompt."""
        if self.items and k > len(self.items):
            k = len(self.items)
        # 1. text -> retrieve -> the neighbours' cached features
        cond, uncond, neighbours = self.condition(prompt, k)
        timings.mark("condition")
        # 2. sample
        latents = self.sample(cond, uncond, self.latent_shape(duration), seed, steps, guidance)
        timings.mark("denoise")
        # 3. decode, vocode
        mel = self.decoder.run(None, {"latents": latents})[0]
        timings.mark("decode")
        v = self.m["vocoder"]
        wave = griffin_lim(mel, self.arrays["mel_pinv"], int(v["n_iter"]), float(v["momentum"]))
        timings.mark("vocode")
        return wave[0], mel[0], neighbours


def default_threads() -> int | None:
    """``$REAUDIO_THREADS`` when set (the CLI passes ``--threads``)."""
    v = os.environ.get("REAUDIO_THREADS")
    return int(v) if v and v.isdigit() and int(v) > 0 else None
