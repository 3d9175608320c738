"""The ``reaudio`` command line. Each subcommand's work lives in its own module; this file
only parses arguments and turns :class:`ReaudioError` into a one-line message (exit 2)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .registry import ReaudioError


def _config_args(p: argparse.ArgumentParser, preset_default: str | None = "offline") -> None:
    p.add_argument("--preset", default=None, help=f"named preset from registry.yaml (default: {preset_default})")
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="YAML override file (repeatable, applied in order)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dot-overrides, e.g. retriever=hnswlib")


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


# -- index / retrieve ------------------------------------------------------------------
def cmd_index_build(args) -> int:
    from .config import compose
    from .database import build_database
    cfg = compose(args.preset or "offline", args.config, args.overrides)
    report = build_database(args.manifest, args.out, cfg, progress=not args.quiet)
    print(report.summary())
    return 0


def cmd_index_add(args) -> int:
    from .database import add_to_database
    report = add_to_database(args.db, args.manifest, progress=not args.quiet)
    print(report.summary())
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
    n = write_manifest(args.inputs, args.out)
    print(f"wrote {n} rows to {args.out}")
    return 0


# -- benchmarks -----------------------------------------------------------------------
def cmd_bench(args) -> int:
    import runpy
    from pathlib import Path
    script = Path(__file__).resolve().parent.parent / "benchmarks" / f"{args.which}.py"
    if not script.exists():
        raise ReaudioError(f"benchmark script not found: {script} (benchmarks run from a source checkout)")
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reaudio", description=__doc__)
    parser.add_argument("--traceback", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list plugins and components by kind")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("index", help="build or extend a retrieval database")
    isub = p.add_subparsers(dest="index_command", required=True)
    b = isub.add_parser("build", help="embed a manifest and write a database directory")
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

    p = sub.add_parser("bench", help="run a benchmark from benchmarks/")
    p.add_argument("which", choices=["retrievers", "generation", "training"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (ReaudioError, FileNotFoundError, ValueError) as exc:
        if args.traceback or os.environ.get("REAUDIO_TRACEBACK"):
            raise
        print(f"reaudio: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reaudio: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
