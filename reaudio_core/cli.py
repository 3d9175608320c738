"""The ``reaudio`` command line. Each subcommand's work lives in its own module; this file
only parses arguments and turns :class:`ReaudioError` into a one-line message (exit 2)."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from .io import check_writable  # noqa: F401  (its old home; every command checks its outputs with it)
from .registry import ReaudioError


def _config_args(p: argparse.ArgumentParser, preset_default: str | None = "offline") -> None:
    p.add_argument("--preset", default=None, help=f"named preset from registry.yaml (default: {preset_default})")
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="YAML override file (repeatable, applied in order)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dot-overrides, e.g. retriever=hnswlib")


def _os_error(exc: OSError) -> str:
    """One line for an OSError: the path(s), the system's reason and the errno name."""
    import errno
    if exc.filename is None:
        return str(exc)
    where = str(exc.filename) + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
    code = errno.errorcode.get(exc.errno or 0)
    return f"{where}: {exc.strerror or exc}{f' [{code}]' if code else ''}"


_SHOWN: set[str] = set()  #: warnings already printed in this command (a note repeating one is not printed again)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """reaudio's own warnings (UserWarning) as one line each; libraries' deprecation notices are not the user's."""
    if not issubclass(category, UserWarning):
        return
    text = " ".join(str(message).split())
    _SHOWN.add(text)
    print(f"reaudio: warning: {text}", file=sys.stderr)


# -- plugins ------------------------------------------------------------------------
def cmd_plugins(args) -> int:
    from .interfaces import KINDS
    from .registry import get_registry
    reg = get_registry()
    if args.json:
        out = {"plugins": [vars(p) | {"detail": None} for p in reg.plugins],
               "components": [{"kind": s.kind, "name": s.name, "plugin": s.plugin, "distribution": s.distribution,
                               "version": s.version, "available": s.cls is not None, "error": s.error,
                               "defaults": s.defaults} for s in reg.components.values()],
               "presets": sorted(reg.presets)}
        print(json.dumps(out, indent=2, default=str))
        return 0
    for kind in KINDS:
        specs = sorted((s for s in reg.components.values() if s.kind == kind), key=lambda s: s.name)
        print(f"{kind}:")
        for s in specs:
            status = "" if s.cls is not None else f"  [unavailable: {s.error}]"
            print(f"  {s.name:<14} {s.distribution} {s.version} (plugin {s.plugin}){status}")
    failed = [p for p in reg.plugins if p.error]
    if failed:
        print("plugins that failed to load:")
        for p in failed:
            print(f"  {p.name} ({p.distribution} {p.version}, {p.module}): {p.error}")
    print("presets: " + ", ".join(sorted(reg.presets)))
    return 0


def cmd_check_plugin(args) -> int:
    from .testing import check_distribution
    results = check_distribution(args.distribution, report=lambda r: print(r.line(), flush=True))
    failed = sum(r.status == "fail" for r in results)
    components = len({(r.kind, r.name) for r in results})
    print(f"{args.distribution}: {components} component(s), {sum(r.status == 'pass' for r in results)} rules passed, "
          f"{failed} failed, {sum(r.status == 'n/a' for r in results)} not applicable")
    return 1 if failed else 0


# -- index / retrieve ------------------------------------------------------------------
def cmd_index_build(args) -> int:
    from .config import compose
    from .database import build_database
    check_writable(args.out, "--out", folder=True)
    cfg = compose(args.preset or "offline", args.config, args.overrides)
    from .distributed import world_size_from_env
    if world_size_from_env() > 1:  # under torchrun: each rank embeds a shard, rank 0 writes
        from .distributed import build_database_distributed
        report = build_database_distributed(args.manifest, args.out, cfg, progress=not args.quiet)
        if report is not None:
            print(report.summary())
        return 0
    report = build_database(args.manifest, args.out, cfg, progress=not args.quiet)
    print(report.summary())
    return 0


def cmd_index_add(args) -> int:
    from .database import add_to_database
    if Path(args.db).is_dir():
        check_writable(args.db, "--db", folder=True)
    report = add_to_database(args.db, args.manifest, progress=not args.quiet)
    print(report.summary())
    return 0


def cmd_index_features(args) -> int:
    from .config import compose
    from .pipeline import ReAudioPipeline
    if args.model:
        pipe = ReAudioPipeline.from_pretrained(args.model, args.overrides, db=args.db)
    else:
        pipe = ReAudioPipeline.from_config(compose(args.preset, args.config, args.overrides), db=args.db)
    for name in pipe.cache_features(progress=not args.quiet):
        print(f"cached {name} for {len(pipe.database)} items in {args.db}")
    return 0


def cmd_retrieve(args) -> int:
    from .database import Database
    db = Database.open(args.db)
    hits = db.retrieve(args.prompt, k=args.k)
    if args.json:
        print(json.dumps({"prompt": args.prompt, "db": str(args.db), "neighbours": hits}, indent=2,
                         ensure_ascii=False))
    else:
        print(f"top {len(hits)} for {args.prompt!r} in {args.db} ({len(db)} items):")
        for i, h in enumerate(hits, 1):
            label = f" [{h['label']}]" if h.get("label") else ""
            print(f"{i:>3}. {h['score']:.4f}  {h['caption']}{label}  ({h['path']})")
    return 0


def cmd_manifest(args) -> int:
    from .database import write_manifest
    check_writable(args.out, "-o", folder=False)
    n = write_manifest(args.inputs, args.out)
    print(f"wrote {n} rows to {args.out}")
    return 0


# -- generate ---------------------------------------------------------------------------
def _split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """Positional words are prompts, except ``dotted.key=value`` words, which are overrides."""
    import re
    pattern = re.compile(r"^[A-Za-z_][\w.]*=")
    prompts = [i for i in items if not pattern.match(i)]
    return prompts, [i for i in items if pattern.match(i)]


def cmd_generate(args) -> int:
    from . import timings
    timings.begin()  # "start": the process's age so far (interpreter start-up, imports)
    from .generate import flag_overrides, load_pipeline, mode_settings, print_notes, write_clip, write_config
    prompts, overrides = _split_overrides(args.items)
    prompts += args.prompt + getattr(args, "after_dashes", [])  # --prompt TEXT and words after `--`: as written
    threads = getattr(args, "thread_count", None)  # --threads / $REAUDIO_THREADS, applied once the engine is known
    if args.prompts:
        _apply_threads(threads)
        from .batch import run_batch
        return run_batch(args, prompts, overrides, shown=_SHOWN)
    if not prompts:
        raise ReaudioError("no prompt given: reaudio generate \"a dog barks\" -o dog.wav (a prompt containing '=' "
                           "needs --prompt \"a=b\" or `--` before it)")
    overrides += flag_overrides(args)
    out = Path(args.output)
    single = out.suffix.lower() == ".wav"
    if single and len(prompts) > 1:
        raise ReaudioError(f"{len(prompts)} prompts need an output directory, not the file {out}")
    check_writable(out, "-o", folder=not single)
    from . import lite  # generation.engine onnx: a bundle runs without torch (reaudio_core/lite)
    plan = lite.plan(args, prompts, overrides)
    if plan.bundle is not None and (plan.bundle / "manifest.json").is_file():
        return lite.generate(args, prompts, plan, out, single, _SHOWN, threads)
    _apply_threads(threads)
    pipe = load_pipeline(args, overrides)
    pipe.cfg["generation"].update(mode_settings(args))  # --audio / --strength / --mask / --retrieve-from
    if plan.engine == "onnx":  # its first run: export the bundle, then generate from it
        if not args.quiet:
            print(f"reaudio: first run of this configuration on the ONNX engine: exporting it once (about 20 s) into "
                  f"{plan.bundle}", file=sys.stderr)
        plan = lite.export_for(pipe, plan)
        if plan.engine == "onnx":
            return lite.generate(args, prompts, plan, out, single, _SHOWN, threads)
    print_notes([plan.note] if plan.note else [], _SHOWN)
    timings.mark("build")
    result = pipe(prompts, progress=not args.quiet)
    print_notes(result.warnings, _SHOWN)
    (out.parent if single else out).mkdir(parents=True, exist_ok=True)
    for i, prompt in enumerate(result.prompts):
        write_clip(out, single, i, prompt, result.waveforms[i], result.mels[i], result.neighbours[i],
                   result.sample_rate, args.png)
    write_config(out, single, pipe.cfg)
    timings.report("write", args.timings)
    return 0


def cmd_serve(args) -> int:
    from .serve import serve
    return serve(args)


# -- train ------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from .config import compose
    from .training import train
    if not args.config and not args.preset:
        raise ReaudioError("reaudio train needs --config FILE (see configs/, e.g. configs/offline-vae.yaml)")
    cfg = compose(args.preset, args.config, args.overrides)
    out = args.out or (cfg.get("training") or {}).get("out")
    if out:
        check_writable(out, "--out" if args.out else "training.out", folder=True)
    result = train(cfg, out=args.out, resume=args.resume, progress=not args.quiet)
    if result is not None:  # rank 0
        print(result.summary())
    return 0


def cmd_distill(args) -> int:
    from .training import distill_config, train
    check_writable(args.out, "--out", folder=True)
    result = train(distill_config(args.teacher, args.config, args.overrides), out=args.out, resume=args.resume,
                   progress=not args.quiet)
    if result is not None:  # rank 0
        print(result.summary())
    return 0


# -- export -----------------------------------------------------------------------------
def cmd_export(args) -> int:
    from .diffusers_folder import export
    out = export(args.model, args.out)
    print(f"wrote {out} (diffusers AudioLDMPipeline; load with AudioLDMPipeline.from_pretrained or "
          f"reaudio generate --model {out})")
    return 0


# -- evaluate ---------------------------------------------------------------------------
def cmd_evaluate(args) -> int:
    from .evaluation import evaluate, to_json, to_markdown
    from .evaluation import parse_model_spec as _model_spec
    from .registry import get_registry
    defaults = get_registry().defaults.get("evaluation", {}) or {}
    features, fparams = _model_spec(args.features or defaults.get("features", "esc50-classifier"))
    classifier, cparams = _model_spec(args.classifier or defaults.get("classifier"))
    clap, _ = _model_spec(args.clap or defaults.get("clap"))
    result = evaluate(args.generated, args.reference, features=features, features_params=fparams,
                      classifier=classifier, classifier_params=cparams, clap=clap, prompts=args.prompts,
                      is_splits=args.is_splits or defaults.get("is_splits", 10),
                      silence_db=defaults.get("silence_db", -70.0), use_cache=not args.no_cache,
                      min_duration=(get_registry().defaults.get("database") or {}).get("min_duration", 0.1),
                      progress=not args.quiet and not args.json)
    print(to_json(result) if args.json else to_markdown(result), end="" if not args.json else "\n")
    return 0


# -- experiment / long-tail report -------------------------------------------------------
def cmd_experiment(args) -> int:
    from .experiment import run_experiment
    result = run_experiment(args.config, args.overrides, out=args.out, dry_run=args.dry_run,
                            progress=not args.quiet)
    if result is not None:
        print(f"{result['out']}/table.md, results.json, k_sweep.png: {len(result['cells'])} cells "
              f"(this run: ran {result['this_run']['ran']}, skipped {result['this_run']['skipped']})")
    return 0


def cmd_longtail(args) -> int:
    from .longtail import longtail_report
    evals = {}
    for item in args.eval:
        name, _, path = item.rpartition("=")
        evals[name or Path(path).stem] = path
    text = longtail_report(args.train, train_labels=args.train_labels, edges=[int(x) for x in args.buckets.split(",")],
                           evals=evals, prompts=args.prompts, prompt_labels=args.prompt_labels,
                           multi_label=args.multi_label, audioset=args.audioset,
                           audioset_source=args.audioset_source, out=args.out)
    print(text, end="")
    return 0


# -- benchmarks -----------------------------------------------------------------------
def cmd_bench(args) -> int:
    """Import ``benchmarks.<which>`` from the source checkout this package lives in and call its ``main(argv)``.
    benchmarks/ is not part of an installed wheel: without it, one line says so."""
    import importlib
    root = Path(__file__).resolve().parent.parent
    script = root / "benchmarks" / args.which  # a module benchmarks/NAME.py or a package benchmarks/NAME/
    if not (script.with_suffix(".py").exists() or (script / "__init__.py").exists()):
        raise ReaudioError(f"benchmark not found: {script} (benchmarks run from a source checkout)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    importlib.import_module(f"benchmarks.{args.which}").main(list(args.rest))
    return 0


THREADS_ENV = "REAUDIO_THREADS"


def _threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, metavar="N",
                   help=f"torch CPU threads (default: ${THREADS_ENV}, else torch's: every core; a busy machine gets a note; "
                        "benchmarks/results/threads.md)")


def _busy_note() -> str | None:
    """A note when the load average leaves fewer free cores than torch will use: beside two busy processes,
    two threads took 12.2 s per offline generation and one thread 5.2 s (OMP_WAIT_POLICY=ACTIVE;
    benchmarks/results/threads.md). Not switched automatically: the thread count changes the last bits of
    the output, and the same command with the same seed must give the same file."""
    torch = sys.modules.get("torch")  # not imported yet (reaudio generate decides its engine first): its default
    cores = os.cpu_count() or 1
    threads = torch.get_num_threads() if torch is not None else int(os.environ.get("OMP_NUM_THREADS") or cores)
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    if threads <= 1 or load < cores:  # the 1-minute average lags: only a machine whose every core is taken
        return None
    free = max(1, int(cores - load + 0.5))
    return (f"the machine is busy (load average {load:.1f} on {cores} cores) and this command uses {threads} threads: "
            f"--threads {free} (or {THREADS_ENV}={free}) may be several times faster")


def _set_threads(flag: int | None, computes: bool = False, apply: bool = True) -> int | None:
    """``--threads N``, else ``$REAUDIO_THREADS``, else torch's default (every core, or ``OMP_NUM_THREADS``),
    with a note from :func:`_busy_note` for a command that computes. Returns N (None: the default); ``apply``
    False leaves torch alone (``reaudio generate`` applies it once it knows its engine: :func:`_apply_threads`)."""
    value = flag if flag is not None else os.environ.get(THREADS_ENV)
    if value is None:
        note = _busy_note() if computes and not os.environ.get("OMP_NUM_THREADS") else None
        if note:
            print(f"reaudio: note: {note}", file=sys.stderr)
        return None
    try:
        n = int(value)
    except ValueError:
        raise ReaudioError(f"{THREADS_ENV}={value!r} is not a whole number of threads") from None
    if n < 1:
        raise ReaudioError(f"threads must be >= 1, got {n}")
    if apply:
        _apply_threads(n)
    return n


def _apply_threads(n: int | None) -> None:
    if n is not None:
        import torch
        torch.set_num_threads(n)


def build_parser() -> argparse.ArgumentParser:
    from .generate import add_mode_args, add_model_args
    from .serve import add_serve_args
    parser = argparse.ArgumentParser(prog="reaudio", description=__doc__)
    parser.add_argument("--traceback", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list plugins and components by kind")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("check-plugin", help="run the contract tests on every component an installed distribution "
                                            "registers (exit 1 on a failed rule)")
    p.add_argument("distribution", help="distribution name, e.g. reaudio-hashtext")
    p.set_defaults(func=cmd_check_plugin)

    p = sub.add_parser("index", help="build or extend a retrieval database")
    isub = p.add_subparsers(dest="index_command", required=True)
    b = isub.add_parser("build", help="embed a manifest and write a database directory")
    _threads_arg(b)
    b.add_argument("--manifest", action="append", required=True, metavar="CSV",
                   help="CSV with audio path (relative to the CSV), caption, optional label; repeatable")
    b.add_argument("--out", required=True, metavar="DIR")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    _config_args(b)
    b.set_defaults(func=cmd_index_build)
    a = isub.add_parser("add", help="add the rows of a manifest to an existing database")
    a.add_argument("--db", required=True, metavar="DIR")
    a.add_argument("--manifest", action="append", required=True, metavar="CSV")
    a.add_argument("--quiet", action="store_true")
    a.set_defaults(func=cmd_index_add)

    f = isub.add_parser("features", help="precompute neighbour caption/audio features of a model into a database")
    f.add_argument("--db", required=True, metavar="DIR")
    f.add_argument("--model", metavar="DIR", help="a saved pipeline; else --preset/--config")
    f.add_argument("--quiet", action="store_true")
    _config_args(f)
    f.set_defaults(func=cmd_index_features)

    p = sub.add_parser("retrieve", help="print the nearest database items for a prompt")
    p.add_argument("--db", required=True, metavar="DIR")
    p.add_argument("prompt")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_retrieve)

    p = sub.add_parser("manifest", help="write a manifest CSV from dataset folders (esc50-fold4, clotho-demo)")
    p.add_argument("inputs", nargs="+", metavar="CSV", help="source CSVs (e.g. metadata.csv, captions.csv)")
    p.add_argument("-o", "--out", required=True)
    p.set_defaults(func=cmd_manifest)

    p = sub.add_parser("generate", help="text -> audio (WAV at 16 kHz)")
    _threads_arg(p)
    p.add_argument("items", nargs="*", metavar="PROMPT|key=value",
                   help="one or more prompts, then optional key=value overrides (a word like a=b is an override: "
                        "give such a prompt with --prompt, or after `--`, where every word is a prompt)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a prompt taken as written, even with '=' in it (repeatable)")
    p.add_argument("-o", "--output", required=True, metavar="FILE.wav|DIR")
    p.add_argument("--prompts", metavar="FILE", help="batch: one prompt per line, or a CSV with prompt and optional "
                   "seed / name columns; -o is a folder, resumable, with manifest.csv (docs/serve.md)")
    add_model_args(p)
    p.add_argument("--png", action="store_true", help="also write a mel-spectrogram PNG per clip")
    p.add_argument("--engine", choices=("torch", "onnx"), help="generation.engine: onnx runs exported graphs without "
                   "torch (docs/fast.md; the first run exports them)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--timings", action="store_true", help="print the wall time of each stage (reaudio_core.timings)")
    add_mode_args(p)  # --audio, --strength, --mask, --retrieve-from
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="a local web page that keeps the models loaded (docs/serve.md)")
    _threads_arg(p)
    add_serve_args(p)
    add_model_args(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dot-overrides, e.g. generation.k=5")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("train", help="train the VAE, the retrieval LDM or the vocoder (torchrun for several processes)")
    _threads_arg(p)
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="YAML file with a training section (repeatable; e.g. configs/offline-ldm.yaml)")
    p.add_argument("--preset", default=None, help="named preset to start from (default: none)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dot-overrides, e.g. training.max_steps=100")
    p.add_argument("--out", metavar="DIR", help="output directory (default: training.out)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("distill", help="a few-step, guidance-distilled student of a saved pipeline (docs/training.md)")
    _threads_arg(p)
    p.add_argument("--teacher", required=True, metavar="MODEL", help="saved pipeline to distil (OUT/final, a --model DIR)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (checkpoints/, log.jsonl, final/)")
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML with training settings (repeatable)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. training.distill_steps=8 training.max_steps=2000")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("export", help="write a saved pipeline as a diffusers AudioLDMPipeline folder")
    p.add_argument("--format", required=True, choices=["diffusers"], help="diffusers: an AudioLDMPipeline folder "
                   "(no retrieval; clap text encoder, unet-ldm, vae, hifigan; docs/checkpoints.md)")
    p.add_argument("--model", required=True, metavar="DIR", help="a saved pipeline (save_pretrained / reaudio train)")
    p.add_argument("out", metavar="OUT", help="output directory (new or empty)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="FAD / KL / IS / CLAP score of generated audio against reference audio")
    p.add_argument("--generated", required=True, metavar="DIR", help="folder of generated clips (any soundfile format)")
    p.add_argument("--reference", required=True, metavar="DIR", help="folder of reference clips; KL pairs same names")
    p.add_argument("--prompts", metavar="CSV", help="file,prompt CSV for the CLAP score")
    p.add_argument("--features", metavar="NAME[:k=v,...]",
                   help="feature model for FAD (default: esc50-classifier); e.g. vggish:checkpoint=PATH")
    p.add_argument("--classifier", metavar="NAME[:k=v,...]",
                   help="feature model for KL / IS (default: --features when it has a classifier head)")
    p.add_argument("--clap", metavar="NAME", help="feature model for the CLAP score (default: clap when registered)")
    p.add_argument("--is-splits", type=int, metavar="N", help="inception-score splits (default 10)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the feature cache")
    p.add_argument("--json", action="store_true", help="print JSON on standard output instead of markdown")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("experiment", help="train, generate and evaluate a grid of variants (Table 1 / Fig. 3 / Fig. 4)")
    p.add_argument("--config", required=True, metavar="FILE", help="experiment YAML (e.g. configs/experiments/esc50-ci.yaml)")
    p.add_argument("--dry-run", action="store_true", help="check config, data and weights; print the plan; compute nothing")
    p.add_argument("--out", metavar="DIR", help="output directory (default: the file's out, else runs/experiments/NAME)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the experiment file, e.g. seeds=[0]")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("longtail", help="label counts in training data, frequency buckets, per-bucket scores (Fig. 4)")
    p.add_argument("--train", required=True, metavar="CSV|DB", help="training manifest CSV or database directory")
    p.add_argument("--train-labels", default="column", metavar="column|audioset|NAME",
                   help="labels from the label/category column (default), a named column, or AudioSet names in captions")
    p.add_argument("--audioset", default="../shared/data/audioset", metavar="DIR", help="folder with ontology.json")
    p.add_argument("--audioset-source", default="ontology", choices=["ontology", "labels"])
    p.add_argument("--buckets", default="0,1,11,101,1001", metavar="E0,E1,...", help="bucket lower edges, from 0")
    p.add_argument("--eval", action="append", default=[], metavar="NAME=JSON",
                   help="a `reaudio evaluate --json` result per model (repeatable)")
    p.add_argument("--prompts", metavar="CSV", help="file,caption[,label] CSV of the evaluated clips")
    p.add_argument("--prompt-labels", default="column", metavar="column|audioset|NAME")
    p.add_argument("--multi-label", default="min", choices=["min", "each"],
                   help="a clip with several labels counts in its rarest label's bucket (min) or in each")
    p.add_argument("--out", metavar="DIR", help="write longtail.md, longtail.json and longtail-<score>.png here")
    p.set_defaults(func=cmd_longtail)

    p = sub.add_parser("bench", help="run a benchmark from benchmarks/")
    p.add_argument("which", choices=["retrievers", "generation", "training", "checks", "threads", "serve", "engines", "seams"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes each record's bare message to the ``sys.stderr`` of the moment (so a replaced stream, e.g.
    pytest's capture, receives it), as the library's ``print(..., file=sys.stderr)`` calls used to."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


@contextlib.contextmanager
def _library_messages():
    """While a command runs, INFO and above from the ``reaudio`` logger (the library's notes, progress and
    warnings) go to stderr as bare lines; afterwards the logger is as it was (the library itself never
    configures logging)."""
    logger = logging.getLogger("reaudio")
    handler, level = _StderrHandler(), logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    after_dashes: list[str] = []
    first = next((a for a in argv if not a.startswith("-")), None)
    if first == "generate" and "--" in argv:  # ``generate -o x.wav -- "a=b dog"``: every word after -- is a prompt
        cut = argv.index("--")
        argv, after_dashes = argv[:cut], argv[cut + 1:]
    args, extra = parser.parse_known_args(argv)
    if args.command == "generate":
        args.after_dashes = after_dashes
    # prompts and key=value overrides may come after options: ``generate "a dog" --seed 1 generation.k=1``
    target = "items" if hasattr(args, "items") else "overrides" if hasattr(args, "overrides") else None
    unknown = [e for e in extra if e.startswith("-") or target is None]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        setattr(args, target, list(getattr(args, target) or []) + extra)
    import warnings
    try:
        args.thread_count = _set_threads(getattr(args, "threads", None), computes=hasattr(args, "threads"),
                                         apply=args.command != "generate")
        with warnings.catch_warnings(), _library_messages():  # a warning is one line too: "reaudio: warning: ..."
            warnings.showwarning = _one_line_warning
            return args.func(args) or 0
    except (ReaudioError, OSError, ValueError) as exc:  # OSError: unwritable, missing or not-a-folder paths
        if args.traceback or os.environ.get("REAUDIO_TRACEBACK"):
            raise
        text = _os_error(exc) if isinstance(exc, OSError) else str(exc)
        print(f"reaudio: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reaudio: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
