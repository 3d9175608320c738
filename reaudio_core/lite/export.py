"""Export a loaded :class:`~reaudio_core.pipeline.ReAudioPipeline` into a bundle that :mod:`.run` generates from
without torch: ONNX graphs of the prompt encoder's network, of each distinct denoiser route
(:meth:`~reaudio_core.interfaces.Denoiser.route`) and of the decoder, plus the arrays a generation reads
(the unconditional inputs, the Griffin-Lim mel inverse) and ``manifest.json`` (what runs, where the database and its
cached neighbour features are). What it covers is :func:`unsupported`'s complement; the rest runs on torch.

Graphs are traced by ``torch.onnx.export`` (the TorchScript exporter, opset 17) with dynamic batch, latent length
and neighbour-stream lengths, and checked against the torch modules on the traced inputs before the bundle counts.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from ..interfaces import Conditioning
from ..io import replace_dir
from ..mel import MEL_FPS
from ..registry import ReaudioError

OPSET = 17
FORMAT = 1  #: manifest format; :mod:`.run` refuses others
FIELDS = ("prompt", "captions", "caption_mask", "audio", "audio_mask", "guidance")
#: what the graphs must reproduce on their traced inputs (float32 CPU; ONNX Runtime fuses differently)
TOLERANCE = {"text": 1e-4, "denoiser": 1e-3, "decoder": 1e-3}


def unsupported(pipe) -> list[str]:
    """Why ``pipe`` cannot run from a bundle (empty: it can)."""
    cfg, gen = pipe.cfg, pipe.cfg["generation"]
    why = []
    if cfg["text_encoder"]["name"] != "minilm":
        why.append(f"text_encoder {cfg['text_encoder']['name']!r} (the ONNX engine runs minilm)")
    if gen["sampler"] != "ddim-trailing":
        why.append(f"sampler {gen['sampler']!r} (the ONNX engine runs ddim-trailing)")
    if cfg["vocoder"]["name"] != "griffin-lim" or cfg["vocoder"]["params"].get("seed") is not None \
            or cfg["vocoder"]["params"].get("mel_inverse") != "pinv":
        why.append("a vocoder other than griffin-lim with mel_inverse pinv and seed null")
    if gen.get("exclude_labels"):
        why.append("generation.exclude_labels")
    if float(gen.get("guidance_rescale") or 0) != 0:
        why.append("generation.guidance_rescale")
    if gen.get("precision") != "fp32":
        why.append(f"generation.precision {gen.get('precision')!r}")
    if gen["retrieval"] != "none":
        if pipe.database is None:
            why.append("no database")
        else:
            for stream, dim in (("caption", pipe.denoiser.text_dim), ("audio", pipe.denoiser.audio_dim)):
                if dim is None or gen["retrieval"] not in (stream.replace("caption", "text"), "audio+text") \
                        or pipe.database.features(pipe._feature_key(stream)) is not None:
                    continue
                if stream == "audio":
                    why.append("the database caches no audio tokens of this model's audio encoder "
                               "(`reaudio index features`)")
                elif cfg.get("caption_encoder") != cfg["text_encoder"]:
                    why.append("uncached caption states from a caption encoder other than the text encoder")
    return why


class _Call(torch.nn.Module):
    """``fn`` on plain tensors, with ``modules``' parameters registered for the exporter."""

    def __init__(self, fn, modules):
        super().__init__()
        self.fn = fn
        self.parts = torch.nn.ModuleList([m for m in modules if isinstance(m, torch.nn.Module)])

    def forward(self, *args):
        return self.fn(*args)


def _export(module, args: tuple, names: list[str], dynamic: dict, path: Path) -> None:
    import warnings
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # the tracer's notes on shape checks it records as constants: _check compares the graph's output instead
        warnings.simplefilter("ignore")
        raw = path.with_name(f"raw-{path.name}")
        torch.onnx.export(module, args, str(raw), input_names=names, output_names=["out"], opset_version=OPSET,
                          dynamic_axes={**dynamic, "out": {0: "batch"}}, dynamo=False)
    # ONNX Runtime's graph rewrites done once here, not at every start (a session on the raw graph takes 2-3x as long
    # to open); the layout rewrites that depend on the machine still run when it opens
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(path)
    ort.InferenceSession(str(raw), opts, providers=["CPUExecutionProvider"])
    raw.unlink()


def _check(path: Path, module, args: tuple, names: list[str], what: str) -> None:
    """The graph's output on ``args`` against the module's (ONNX Runtime drops inputs the graph does not use)."""
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    used = {i.name for i in session.get_inputs()}
    got = session.run(None, {n: a.numpy() for n, a in zip(names, args) if n in used})[0]
    with torch.inference_mode():
        ref = module(*args).float().numpy()
    err = float(np.abs(got - ref).max() / max(1.0, float(np.abs(ref).max())))
    if not np.isfinite(err) or err > TOLERANCE[what]:
        raise ReaudioError(f"the exported {what} graph differs from the torch module by {err:.2e} (relative; "
                           f"limit {TOLERANCE[what]:g}): this model does not trace to ONNX faithfully")


def _text(pipe, out: Path) -> dict:
    """The minilm prompt encoder: its BERT as ``text.onnx`` (input_ids, attention_mask, token_type_ids ->
    last hidden states) and its tokenizer as ``tokenizer.json`` for the ``tokenizers`` library."""
    enc = pipe.text_encoder
    model = enc.model
    batch = enc.tokenizer(["a dog barks", "rain"], padding="longest", return_tensors="pt")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    args = tuple(batch[n] for n in names)
    call = _Call(lambda *a: model(**dict(zip(names, a))).last_hidden_state, [model]).eval()
    dyn = {n: {0: "batch", 1: "tokens"} for n in names}
    _export(call, args, names, dyn, out / "text.onnx")
    _check(out / "text.onnx", call, args, names, "text")
    enc.tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    return {"graph": "text.onnx", "tokenizer": "tokenizer.json", "max_length": int(enc.max_length),
            "pooling": "mean-l2", "dim": int(enc.dim)}


def _denoiser(pipe, cond: Conditioning, shape, out: Path) -> dict:
    """One graph per distinct route over the 1000 training timesteps; ``routes`` maps timestep ranges to graphs."""
    d = pipe.denoiser
    T = pipe.cfg["diffusion"]["num_train_timesteps"]
    present = [f for f in FIELDS if getattr(cond, f) is not None]
    routes, graphs = [], {}
    for t in range(T):
        r = d.route(t)
        if routes and routes[-1][2] is r:
            routes[-1][1] = t
        else:
            routes.append([t, t, r])
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, *shape, generator=g)
    for lo, hi, r in routes:
        if id(r) in graphs:
            continue
        name = f"denoiser-{len(graphs)}.onnx"

        def fn(x, t, *fields, r=r):
            return r(x, t, Conditioning(**dict(zip(present, fields))))
        call = _Call(fn, [getattr(r, "model", None)]).eval()
        args = (latents, torch.tensor([(lo + hi) // 2]), *[getattr(cond, f) for f in present])
        names = ["latents", "timesteps", *present]
        dyn = {"latents": {0: "batch", 2: "frames"}, "timesteps": {0: "batch"},
               **{f: {0: "batch"} for f in present},
               **{f: {0: "batch", 1: "captions"} for f in ("captions", "caption_mask") if f in present},
               **{f: {0: "batch", 1: "tokens"} for f in ("audio", "audio_mask") if f in present}}
        _export(call, args, names, dyn, out / name)
        _check(out / name, call, args, names, "denoiser")
        graphs[id(r)] = name
    return {"routes": [[lo, hi, graphs[id(r)]] for lo, hi, r in routes], "inputs": present,
            "guidance_input": bool(getattr(d, "guidance_input", False)), "in_channels": int(d.in_channels),
            "downsample": int(d.downsample)}


def _decoder(pipe, shape, out: Path) -> dict:
    dec = pipe.decoder
    latents = torch.randn(1, *shape, generator=torch.Generator().manual_seed(1))
    call = _Call(lambda z: dec.decode(z), [getattr(dec, "model", None)]).eval()
    _export(call, (latents,), ["latents"], {"latents": {0: "batch", 2: "frames"}}, out / "decoder.onnx")
    _check(out / "decoder.onnx", call, (latents,), ["latents"], "decoder")
    return {"graph": "decoder.onnx", "latent_channels": int(dec.latent_channels), "compression": int(dec.compression),
            "mel_fps": MEL_FPS}


def export_bundle(pipe, out: str | Path, request: dict | None = None) -> Path:
    """Write ``pipe``'s bundle into ``out`` (replaced atomically). ``request``: what asked for it (kept in the
    manifest). Raises :class:`ReaudioError` when :func:`unsupported` names anything."""
    from ..mel import mel_basis
    why = unsupported(pipe)
    if why:
        raise ReaudioError("this pipeline cannot run on the ONNX engine: " + "; ".join(why))
    cfg, gen = pipe.cfg, pipe.cfg["generation"]
    out = Path(out)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")  # two first runs at once each write their own
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    k = int(gen["k"])
    with torch.inference_mode():
        cond, uncond, _ = pipe.condition(["a dog barks"], k)
    if pipe.denoiser.guidance_input:
        cond.guidance = torch.full((1,), float(gen["guidance"]))
    shape = pipe.latent_shape(float(gen["duration"]))
    arrays = {f"uncond_{f}": getattr(uncond, f).numpy() for f in FIELDS if getattr(uncond, f) is not None}
    arrays["mel_pinv"] = torch.linalg.pinv(mel_basis().double()).float().numpy()
    np.savez(tmp / "arrays.npz", **arrays)
    manifest = {"format": FORMAT, "request": request or {}, "config": _plain(cfg), "export_k": k,
                "text": _text(pipe, tmp), "denoiser": _denoiser(pipe, cond, shape, tmp),
                "decoder": _decoder(pipe, shape, tmp), "vocoder": dict(cfg["vocoder"]["params"]),
                "diffusion": dict(cfg["diffusion"]), "database": _database(pipe)}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str), encoding="utf-8")
    replace_dir(tmp, out)
    return out


def _database(pipe) -> dict | None:
    db = pipe.database
    if db is None:
        return None
    spec_cls = type(db.index)
    while spec_cls.__module__ == "reaudio_core.checks":  # a checking subclass (reaudio_core.checks.checked)
        spec_cls = spec_cls.__bases__[0]
    saved = (db.config.get("retriever") or {}).get("params") or {}
    applied = {k: v for k, v in (db.retriever_entry.get("params") or {}).items() if saved.get(k) != v}
    features = {s: pipe._feature_key(s) for s in ("caption", "audio")}
    return {"version_dir": str(db.version_dir.resolve()), "size": len(db), "retriever": db.retriever_entry["name"],
            "module": spec_cls.__module__, "cls": spec_cls.__qualname__, "params": applied,
            "features": {s: n for s, n in features.items() if db.features(n) is not None}}


def _plain(cfg: dict) -> dict:
    """The configuration as JSON (paths as strings)."""
    return json.loads(json.dumps({k: v for k, v in cfg.items()}, default=str))

