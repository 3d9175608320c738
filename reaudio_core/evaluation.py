"""Evaluation of a folder of generated audio against a folder of reference audio (reference section 6).

Metrics, as audioldm_eval computes them:

* **FAD**: Frechet distance between two Gaussians fitted to the feature frames of each folder
  (every frame of every clip pooled; mean and unbiased covariance).
* **KL**: mean over clip pairs of ``KL(softmax(reference logits) || softmax(generated logits))``;
  a pair is a generated and a reference file with the same name (relative path without suffix,
  so ``gen/dog_01.wav`` pairs with ``ref/dog_01.flac``). Computed with log-softmax (no epsilon).
* **IS**: inception score of the generated logits: clips shuffled with seed 2020, cut into 10
  splits, ``exp(mean_i KL(p_i || mean p))`` per split; mean and standard deviation over splits.
* **CLAP score**: 100 x mean cosine between each generated clip's CLAP audio embedding and the CLAP
  text embedding of its prompt (``--prompts`` CSV), when a CLAP feature model is available.

Scores are only comparable with the same feature model, sample rate and set size: every result
names all three. Clips are read with soundfile (any format it reads), averaged to mono and
resampled to the feature model's rate (with a note when rates differ); empty, unreadable,
non-finite, silent and too-short (``database.min_duration``) clips are excluded and listed, too-short
ones with a warning. Features are cached under ``$REAUDIO_CACHE/features`` (default
``~/.cache/reaudio/features``) keyed on the sha256 of the file's bytes, the feature model's name and
its fingerprint (weights + preprocessing), so a cache entry can never be stale: changed content is a
different key.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import soundfile as sf
import torch

from .io import atomic_write
from .registry import ReaudioError

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".snd",
                  ".w64", ".rf64", ".caf", ".wv"}
IS_SEED = 2020
FILE_COLUMNS = ("file", "filename", "name", "path", "audio", "wav")
PROMPT_COLUMNS = ("prompt", "caption", "text")


# -- metric maths -------------------------------------------------------------------------------
def gaussian(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of ``[N, d]`` frames (float64)."""
    x = np.asarray(frames, dtype=np.float64)
    return x.mean(0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2)``.

    ``tr (S1 S2)^1/2`` is the sum of square roots of the eigenvalues of ``S1^1/2 S2 S1^1/2``
    (symmetric PSD), which is stable for the rank-deficient covariances of small sets.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape} vs {mu2.shape}")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root @ s2 @ root
    ev = np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(ev).sum(), 0.0))


def kl_per_pair(reference_logits, generated_logits) -> np.ndarray:
    """``KL(softmax(ref_i) || softmax(gen_i))`` for each row pair (nats)."""
    r = torch.as_tensor(reference_logits, dtype=torch.float64)
    g = torch.as_tensor(generated_logits, dtype=torch.float64)
    lr, lg = r.log_softmax(-1), g.log_softmax(-1)
    return (lr.exp() * (lr - lg)).sum(-1).numpy()


def inception_score(logits, splits: int = 10, seed: int | None = IS_SEED) -> tuple[float, float]:
    """``(mean, std)`` over ``splits`` of ``exp(mean KL(p(y|x) || p(y)))``; needs ``len(logits) >= splits``."""
    x = torch.as_tensor(logits, dtype=torch.float64)
    n = len(x)
    if n < splits:
        raise ValueError(f"inception score needs at least {splits} clips (one per split), got {n}")
    if seed is not None:
        x = x[np.random.RandomState(seed).permutation(n)]
    logp = x.log_softmax(-1)
    scores = []
    for i in range(splits):
        lp = logp[i * n // splits:(i + 1) * n // splits]
        lq = torch.logsumexp(lp, 0) - np.log(len(lp))  # log of the split's mean p
        scores.append(float((lp.exp() * (lp - lq)).sum(-1).mean().exp()))
    return float(np.mean(scores)), float(np.std(scores))


# -- folders --------------------------------------------------------------------------------------
@dataclass
class Clip:
    key: str  #: relative path without suffix (the pairing name)
    path: Path
    sha256: str = ""
    native_sr: int = 0
    wav: np.ndarray | None = field(default=None, repr=False)
    problem: str | None = None


def scan(folder: str | Path, what: str, notes: list[str]) -> list[Clip]:
    folder = Path(folder)
    if folder.is_file():
        raise ReaudioError(f"{what} {folder} is a file; give the folder of {what} clips")
    if not folder.is_dir():
        raise ReaudioError(f"{what} folder not found: {folder}")
    clips: dict[str, Clip] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES):
        key = path.relative_to(folder).with_suffix("").as_posix()
        if key in clips:
            notes.append(f"{what}: {path.name} has the same name as {clips[key].path.name}; using the first")
            continue
        clips[key] = Clip(key, path)
    if not clips:
        raise ReaudioError(f"no audio files in {what} folder {folder} (looked for "
                           f"{', '.join(sorted(s[1:] for s in AUDIO_SUFFIXES))})")
    return list(clips.values())


def read_clip(clip: Clip, sample_rate: int, silence_db: float, min_duration: float = 0.0) -> None:
    """Fill ``sha256``, ``native_sr`` and ``wav`` (mono float32 at ``sample_rate``) or ``problem`` (also for a
    clip shorter than ``min_duration`` seconds, as ``reaudio index build`` skips one)."""
    data = clip.path.read_bytes()
    clip.sha256 = hashlib.sha256(data).hexdigest()
    if not data:
        clip.problem = "empty file (0 bytes)"
        return
    try:
        wav, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:
        clip.problem = f"unreadable audio ({type(exc).__name__}: {str(exc).strip()[:120]})"
        return
    clip.native_sr = int(sr)
    if wav.size == 0:
        clip.problem = "empty: no samples"
        return
    wav = wav.mean(axis=1)
    if not np.isfinite(wav).all():
        clip.problem = "non-finite samples"
        return
    if len(wav) / sr < min_duration:
        clip.problem = f"too short: {len(wav) / sr:.3f} s < {min_duration:g} s"
        return
    peak = float(np.abs(wav).max())
    if peak <= 10 ** (silence_db / 20):
        clip.problem = f"silent: peak {20 * np.log10(peak + 1e-12):.1f} dBFS <= {silence_db:g} dBFS"
        return
    from .audio import resample
    clip.wav = np.ascontiguousarray(resample(wav, sr, sample_rate), dtype=np.float32)


def read_prompts(path: str | Path) -> dict[str, str]:
    """``{file stem: prompt}`` from a CSV with a file column and a prompt column (header names flexible)."""
    path = Path(path)
    if not path.is_file():
        raise ReaudioError(f"prompts CSV {path} is a folder; give the CSV file" if path.is_dir()
                           else f"prompts CSV not found: {path}")
    rows = list(csv.DictReader(path.open(encoding="utf-8", newline="")))
    cols = {c.strip().lower(): c for c in (rows[0].keys() if rows else [])}
    fcol = next((cols[c] for c in FILE_COLUMNS if c in cols), None)
    pcol = next((cols[c] for c in PROMPT_COLUMNS if c in cols), None)
    if fcol is None or pcol is None:
        raise ReaudioError(f"{path}: needs a file column ({'/'.join(FILE_COLUMNS)}) and a prompt column "
                           f"({'/'.join(PROMPT_COLUMNS)}); found {', '.join(cols) or 'no header'}")
    out = {}
    for r in rows:
        name = (r.get(fcol) or "").strip()
        if name:
            out[Path(name).with_suffix("").as_posix()] = (r.get(pcol) or "").strip()
    return out


# -- features and their cache ---------------------------------------------------------------------
def cache_root() -> Path:
    root = os.environ.get("REAUDIO_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "reaudio") / "features"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


class FeatureCache:
    """One ``.npz`` per (file content, feature model, fingerprint); writes are atomic."""

    def __init__(self, root: Path | None, model):
        self.dir = None if root is None else (root / _safe(model.name) / str(model.fingerprint)[:32] /
                                              f"sr{model.sample_rate}")
        self.hits = self.computed = 0

    def path(self, sha: str) -> Path:
        return self.dir / sha[:2] / f"{sha}.npz"

    def get(self, sha: str) -> dict | None:
        if self.dir is None:
            return None
        p = self.path(sha)
        if not p.exists():
            return None
        try:
            with np.load(p) as z:
                out = {k: z[k] for k in z.files}
        except Exception:  # a damaged entry is recomputed
            return None
        self.hits += 1
        return out

    def put(self, sha: str, entry: dict) -> None:
        self.computed += 1
        if self.dir is None:
            return
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a bare name
                np.savez(f, **entry)
        atomic_write(self.path(sha), write)


def extract(model, clips: Sequence[Clip], cache: FeatureCache, *, logits: bool, batch_size: int = 8,
            progress: bool = False, desc: str = "") -> list[dict]:
    """Per clip ``{'frames': [n, d], 'logits': [C] (when asked)}`` from the cache or the model."""
    out: list[dict | None] = [cache.get(c.sha256) for c in clips]
    todo = [i for i, e in enumerate(out) if e is None or (logits and "logits" not in e)]
    from tqdm import tqdm
    bar = tqdm(total=len(todo), desc=desc, unit="clip", disable=not progress or not todo, leave=False)
    for s in range(0, len(todo), batch_size):
        idx = todo[s:s + batch_size]
        wavs = [clips[i].wav for i in idx]
        if logits and hasattr(model, "embed_and_logits"):
            frames, lg = model.embed_and_logits(wavs)
        else:
            frames = model.embed_frames(wavs)
            lg = model.logits(wavs) if logits else None
        for j, i in enumerate(idx):
            entry = {"frames": np.asarray(frames[j], dtype=np.float32)}
            if lg is not None:
                entry["logits"] = torch.as_tensor(lg[j]).float().numpy()
            cache.put(clips[i].sha256, entry)
            out[i] = entry
        bar.update(len(idx))
    bar.close()
    return out  # type: ignore[return-value]


def _describe(model) -> dict:
    return {"name": model.name, "sample_rate": int(model.sample_rate), "fingerprint": str(model.fingerprint)[:16],
            "num_classes": int(getattr(model, "num_classes", 0) or 0),
            "weights": getattr(model, "checkpoint", None) or getattr(model, "weights", None)}


def parse_model_spec(text: str | None) -> tuple[str | None, dict]:
    """``NAME`` or ``NAME:key=value,key=value`` -> (name, params); values are parsed as YAML scalars."""
    if not text:
        return None, {}
    import yaml
    name, _, rest = text.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        if "=" not in item:
            raise ReaudioError(f"feature-model parameter '{item}' is not key=value (e.g. vggish:checkpoint=PATH)")
        key, value = item.split("=", 1)
        params[key.strip()] = yaml.safe_load(value)
    return name.strip(), params


def _model(spec, params=None):
    if spec is None or not isinstance(spec, str):
        return spec
    from .registry import create
    return create("feature_model", spec, **(params or {}))


# -- the evaluation --------------------------------------------------------------------------------
def evaluate(generated: str | Path, reference: str | Path, *, features: Any = "esc50-classifier",
             classifier: Any = None, clap: Any = None, prompts: str | Path | dict | None = None,
             features_params: dict | None = None, classifier_params: dict | None = None,
             is_splits: int = 10, silence_db: float = -70.0, min_duration: float = 0.1, use_cache: bool = True,
             progress: bool = False) -> dict:
    """Score ``generated`` against ``reference``; returns a JSON-ready dict (see :func:`to_markdown`).

    ``features`` / ``classifier`` / ``clap``: registered feature-model names or instances.
    ``classifier`` (KL, IS) defaults to ``features`` when that has a classifier head. ``clap``
    (CLAP score) must provide ``embed_text``; by default the registered ``clap`` feature model is
    used when ``prompts`` are given and it exists. Clips shorter than ``min_duration`` seconds (the CLI passes
    ``database.min_duration``) are excluded like silent ones, with a warning: their features would be mostly
    padding.
    """
    notes: list[str] = []
    warnings: list[str] = []
    fad_model = _model(features, features_params)
    if classifier is None:
        cls_model = fad_model if getattr(fad_model, "num_classes", 0) else None
    else:
        cls_model = _model(classifier, classifier_params)
        if not getattr(cls_model, "num_classes", 0):
            raise ReaudioError(f"feature model '{cls_model.name}' has no classifier head: it cannot give KL / IS")
    prompt_map = (read_prompts(prompts) if isinstance(prompts, (str, Path)) else dict(prompts)) if prompts else None
    clap_model, clap_reason = None, None
    if prompt_map is None:
        clap_reason = "no prompts given (--prompts CSV with file and prompt columns)"
    elif clap is None:
        from .registry import get_registry
        if "clap" in get_registry().names("feature_model"):
            try:
                clap_model = _model("clap")
            except (ReaudioError, OSError) as exc:  # e.g. no CLAP weights on this machine
                clap_reason = f"the clap feature model could not be built: {exc}"
        else:
            clap_reason = "no CLAP feature model is registered (install/enable the clap plugin)"
    else:
        clap_model = _model(clap)
    if clap_model is not None and not hasattr(clap_model, "embed_text"):
        raise ReaudioError(f"feature model '{clap_model.name}' has no text tower (embed_text): it cannot give a CLAP score")

    sets = {"generated": scan(generated, "generated", notes), "reference": scan(reference, "reference", notes)}
    models = [m for m in (fad_model, cls_model, clap_model) if m is not None]
    rates = {int(m.sample_rate) for m in models}
    if len(rates) > 1:
        raise ReaudioError(f"feature models disagree on the sample rate ({sorted(rates)}); evaluate them separately")
    sr = rates.pop()
    excluded = []
    for what, clips in sets.items():
        for c in clips:
            read_clip(c, sr, silence_db, min_duration)
            if c.problem:
                excluded.append({"set": what, "file": str(c.path), "reason": c.problem})
        short = [c for c in clips if c.problem and c.problem.startswith("too short")]
        if short:
            warnings.append(f"{what}: {len(short)} clip(s) shorter than {min_duration:g} s excluded from every score: "
                            + ", ".join(f"{c.path.name} ({c.problem})" for c in short[:5])
                            + (" ..." if len(short) > 5 else ""))
        bad = [c for c in clips if c.problem]
        if bad:
            notes.append(f"{what}: {len(bad)} clip(s) excluded (silent, too short, empty or unreadable): "
                         + ", ".join(f"{c.path.name} ({c.problem})" for c in bad[:5]) + (" ..." if len(bad) > 5 else ""))
        sets[what] = [c for c in clips if not c.problem]
        if not sets[what]:
            raise ReaudioError(f"no usable clips in the {what} folder: all {len(clips)} were excluded "
                               f"({clips[0].problem}{', ...' if len(clips) > 1 else ''})")
    native = {what: sorted({c.native_sr for c in clips}) for what, clips in sets.items()}
    if any(r != sr for rs in native.values() for r in rs):
        notes.append("sample rates " + "; ".join(f"{w}: {', '.join(f'{r} Hz' for r in rs)}" for w, rs in native.items())
                     + f" -> all resampled to {sr} Hz (the feature model's rate)")
    if native["generated"] != native["reference"]:
        warnings.append(f"generated ({'/'.join(map(str, native['generated']))} Hz) and reference "
                        f"({'/'.join(map(str, native['reference']))} Hz) sample rates differ: both were resampled "
                        f"to {sr} Hz, but band-limited generations can still score differently")

    root = cache_root() if use_cache else None
    caches, feats = {}, {}
    for role, model in (("fad", fad_model), ("classifier", cls_model), ("clap", clap_model)):
        if model is None:
            continue
        if model is fad_model and role != "fad":
            feats[role], caches[role] = feats["fad"], caches["fad"]
            continue
        cache = caches[role] = FeatureCache(root, model)
        want_logits = role == "classifier" or (role == "fad" and model is cls_model)
        feats[role] = {what: extract(model, clips, cache, logits=want_logits, progress=progress,
                                     desc=f"{model.name}: {what}") for what, clips in sets.items()}

    gen, ref = sets["generated"], sets["reference"]
    metrics: dict[str, Any] = {"fad": None, "kl": None, "is": None, "is_std": None, "clap_score": None}
    not_computed: dict[str, str] = {}
    items = {c.key: {"name": c.key, "file": str(c.path)} for c in gen}

    # FAD
    fg = np.concatenate([e["frames"] for e in feats["fad"]["generated"]])
    fr = np.concatenate([e["frames"] for e in feats["fad"]["reference"]])
    dim = fg.shape[1]
    if len(fg) < 2 or len(fr) < 2:
        not_computed["fad"] = (f"FAD needs at least 2 feature frames per set to fit a Gaussian; got "
                               f"{len(fg)} generated, {len(fr)} reference")
        warnings.append(not_computed["fad"])
    else:
        metrics["fad"] = frechet_distance(*gaussian(fg), *gaussian(fr))
        if min(len(fg), len(fr)) <= dim:
            warnings.append(f"FAD from {len(fg)} generated / {len(fr)} reference frames of a {dim}-d feature: "
                            f"the covariance needs more than {dim} frames per set to be full rank; the value is "
                            "biased by set size and only comparable at the same set size")

    # KL and IS
    pairs = sorted(set(c.key for c in gen) & set(c.key for c in ref))
    if cls_model is None:
        reason = (f"feature model '{fad_model.name}' has no classifier head; pass a classifier "
                  "(e.g. --classifier panns-cnn14 or esc50-classifier)")
        not_computed["kl"] = not_computed["is"] = reason
    else:
        lg_gen = {c.key: e["logits"] for c, e in zip(gen, feats["classifier"]["generated"])}
        lg_ref = {c.key: e["logits"] for c, e in zip(ref, feats["classifier"]["reference"])}
        if not pairs:
            ex_g = ", ".join(c.key for c in gen[:3])
            ex_r = ", ".join(c.key for c in ref[:3])
            not_computed["kl"] = (f"KL needs pairs: a generated and a reference clip with the same file name "
                                  f"(suffix ignored); none of the {len(gen)} generated names ({ex_g}, ...) matches "
                                  f"any of the {len(ref)} reference names ({ex_r}, ...). Name each generated clip "
                                  "after its reference clip to get KL.")
            warnings.append(not_computed["kl"])
        else:
            kl = kl_per_pair(np.stack([lg_ref[k] for k in pairs]), np.stack([lg_gen[k] for k in pairs]))
            metrics["kl"] = float(kl.mean())
            for k, v in zip(pairs, kl):
                items[k]["kl"] = float(v)
            if len(pairs) < max(len(gen), len(ref)):
                notes.append(f"KL over {len(pairs)} pairs; {len(gen) - len(pairs)} generated and "
                             f"{len(ref) - len(pairs)} reference clips have no partner of the same name")
        if len(gen) < is_splits:
            not_computed["is"] = (f"IS needs at least {is_splits} generated clips (one per split, {is_splits} "
                                  f"splits); got {len(gen)}")
            warnings.append(not_computed["is"])
        else:
            metrics["is"], metrics["is_std"] = inception_score(np.stack([lg_gen[c.key] for c in gen]), is_splits)
        labels = getattr(cls_model, "labels", None)
        for c in gen:
            p = torch.as_tensor(lg_gen[c.key]).double().softmax(-1)
            top = int(p.argmax())
            items[c.key]["top_class"] = labels[top] if labels else top
            items[c.key]["top_prob"] = float(p[top])

    # CLAP score
    if clap_model is None:
        not_computed["clap_score"] = clap_reason
    else:
        with_prompt = [(c, e) for c, e in zip(gen, feats["clap"]["generated"])
                       if prompt_map.get(c.key, prompt_map.get(Path(c.key).name)) is not None]
        missing = len(gen) - len(with_prompt)
        if missing:
            notes.append(f"CLAP score: {missing} generated clip(s) have no prompt in the CSV and are left out")
        if not with_prompt:
            not_computed["clap_score"] = "no generated clip has a prompt in the CSV (matched by file name)"
        else:
            texts = [prompt_map.get(c.key, prompt_map.get(Path(c.key).name)) for c, _ in with_prompt]
            t = torch.nn.functional.normalize(torch.as_tensor(clap_model.embed_text(texts)).float(), dim=-1)
            a = torch.nn.functional.normalize(torch.from_numpy(np.stack([e["frames"].mean(0) for _, e in with_prompt])),
                                              dim=-1)
            cos = (a * t).sum(-1).numpy()
            metrics["clap_score"] = float(100 * cos.mean())
            for (c, _), v, text in zip(with_prompt, cos, texts):
                items[c.key]["clap_cosine"] = float(v)
                items[c.key]["prompt"] = text

    return {
        "generated": str(generated), "reference": str(reference), "sample_rate": sr,
        "feature_models": {"fad": _describe(fad_model), "classifier": _describe(cls_model) if cls_model else None,
                           "clap": _describe(clap_model) if clap_model else None},
        "set_size": {"generated": len(gen), "reference": len(ref), "pairs": len(pairs),
                     "generated_frames": int(len(fg)), "reference_frames": int(len(fr)), "frame_dim": int(dim),
                     "is_splits": is_splits},
        "metrics": metrics, "not_computed": not_computed, "notes": notes, "warnings": warnings,
        "excluded": excluded, "items": list(items.values()),
        "cache": {"dir": str(root) if root else None, "hits": sum(c.hits for c in set(caches.values())),
                  "computed": sum(c.computed for c in set(caches.values()))},
    }


def _fmt(v, digits=3):
    return "n/a" if v is None else f"{v:.{digits}f}"


def to_markdown(r: dict) -> str:
    m, s, fm = r["metrics"], r["set_size"], r["feature_models"]
    sr = f"{r['sample_rate']} Hz"
    def name(d):
        return f"`{d['name']}`" if d else "-"
    rows = [
        ("FAD", _fmt(m["fad"]), name(fm["fad"]),
         f"{s['generated']} gen / {s['reference']} ref clips ({s['generated_frames']} / {s['reference_frames']} "
         f"frames, {s['frame_dim']}-d)"),
        ("KL", _fmt(m["kl"]), name(fm["classifier"]), f"{s['pairs']} pairs"),
        ("IS", "n/a" if m["is"] is None else f"{m['is']:.3f} ± {m['is_std']:.3f}", name(fm["classifier"]),
         f"{s['generated']} clips, {s['is_splits']} splits"),
        ("CLAP score", _fmt(m["clap_score"], 2), name(fm["clap"]),
         f"{sum('clap_cosine' in i for i in r['items'])} clips with prompts"),
    ]
    out = [f"# Evaluation: {r['generated']} vs {r['reference']}", "",
           f"Sample rate {sr}; {s['generated']} generated and {s['reference']} reference clips used.", "",
           "| metric | value | feature model | sample rate | set size |", "|---|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {sr} | {d} |" for a, b, c, d in rows]
    if r["not_computed"]:
        out += ["", "## Not computed", ""] + [f"- **{k}**: {v}" for k, v in r["not_computed"].items()]
    if r["warnings"]:
        out += ["", "## Warnings", ""] + [f"- {w}" for w in r["warnings"] if w not in r["not_computed"].values()]
    if r["notes"]:
        out += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    if r["excluded"]:
        out += ["", "## Excluded clips", "", "| set | file | reason |", "|---|---|---|"]
        out += [f"| {e['set']} | {e['file']} | {e['reason']} |" for e in r["excluded"]]
    out += ["", "## Per-item scores", "", "| clip | KL | CLAP cosine | top class (p) |", "|---|---|---|---|"]
    for it in r["items"]:
        top = f"{it['top_class']} ({it['top_prob']:.2f})" if "top_class" in it else "-"
        out.append(f"| {it['name']} | {_fmt(it.get('kl'))} | {_fmt(it.get('clap_cosine'))} | {top} |")
    fps = ", ".join(f"{k}: `{v['name']}` {v['fingerprint']}" for k, v in fm.items() if v)
    out += ["", f"Feature models (fingerprints): {fps}. Cache: {r['cache']['hits']} hits, "
            f"{r['cache']['computed']} computed ({r['cache']['dir'] or 'off'})."]
    return "\n".join(out) + "\n"


def to_json(r: dict) -> str:
    return json.dumps(r, indent=2, ensure_ascii=False)
