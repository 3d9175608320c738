"""Batch runs: ``reaudio generate --prompts FILE -o DIR``.

FILE is either text, one prompt per line (blank lines and lines starting with ``#`` are skipped), or a CSV
(``.csv``) with a header naming a ``prompt`` column (``caption`` / ``text`` also work) and optional ``seed``,
``name`` and ``label`` columns. Each prompt becomes ``DIR/NAME.wav``: NAME is the row's ``name``, else the prompt, made
file-name-safe (letters, digits, ``_`` and ``-``) and unique in the run (``-2``, ``-3``, ... in file order).

The models are loaded once. Each WAV is written atomically (:mod:`reaudio_core.io`), so a killed run leaves
whole files only, and a run again with the same command skips every output that exists. ``DIR/manifest.csv``
lists every output of the file (``path, caption, seed, label, neighbours, neighbour_ids, neighbour_scores``,
rewritten after each clip): with its ``path`` and ``caption`` columns it is a manifest for ``reaudio index build``
and a prompts CSV for ``reaudio evaluate --prompts``. ``DIR/config.yaml`` is the configuration that ran; a run
into a folder written with another configuration is refused, so one folder never mixes models or settings.
"""
from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .registry import ReaudioError

log = logging.getLogger("reaudio")

MANIFEST = "manifest.csv"
COLUMNS = ("path", "caption", "seed", "label", "neighbours", "neighbour_ids", "neighbour_scores")
PROMPT_COLUMNS = ("prompt", "caption", "text")
MAX_NAME = 60


@dataclass
class Job:
    prompt: str
    line: int  #: line of FILE (1-based)
    seed: int | None = None  #: the row's seed; None: the run's (--seed / generation.seed)
    name: str = ""  #: the output's stem, unique in the run
    label: str = ""  #: the row's label (CSV), copied to the manifest


def _int_cell(text: str, what: str, where: str) -> int | None:
    text = text.strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        raise ReaudioError(f"{where}: {what} must be a whole number, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise ReaudioError(f"{where}: {what} must be from 0 to 2**63 - 1, got {value}")
    return value


def read_prompts_file(path: str | Path) -> list[Job]:
    """The jobs of a prompts file (module docstring), names made unique. An empty file, a CSV without a
    prompt column, a bad seed or an undecodable file is a :class:`ReaudioError` naming the line."""
    path = Path(path)
    if not path.is_file():
        raise ReaudioError(f"--prompts {path}: " + ("a folder; give a text or CSV file" if path.is_dir() else "not found"))
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ReaudioError(f"--prompts {path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    jobs: list[Job] = []
    names: list[str] = []
    if path.suffix.lower() == ".csv":
        reader = csv.reader(io.StringIO(text, newline=""))
        try:
            header = [h.strip().lower() for h in next(reader)]
        except StopIteration:
            raise ReaudioError(f"--prompts {path} is empty: it needs a header with a prompt column") from None
        col = next((header.index(c) for c in PROMPT_COLUMNS if c in header), None)
        if col is None:
            raise ReaudioError(f"--prompts {path}: no prompt column ({' | '.join(PROMPT_COLUMNS)}); its columns are: "
                               f"{', '.join(header) or '(none)'}")
        seed_col = header.index("seed") if "seed" in header else None
        name_col = header.index("name") if "name" in header else None
        label_col = header.index("label") if "label" in header else None
        try:
            for row in reader:
                cell = lambda i: row[i].strip() if i is not None and i < len(row) else ""  # noqa: E731
                if not cell(col) or cell(col).startswith("#"):
                    continue
                where = f"{path}, line {reader.line_num}"
                jobs.append(Job(cell(col), reader.line_num, _int_cell(cell(seed_col), "seed", where),
                                label=cell(label_col)))
                names.append(cell(name_col))
        except csv.Error as exc:
            raise ReaudioError(f"--prompts {path}, line {reader.line_num}: not a readable CSV ({exc})") from None
    else:
        for i, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if line and not line.startswith("#"):
                jobs.append(Job(line, i))
                names.append("")
    if not jobs:
        raise ReaudioError(f"--prompts {path} holds no prompt (blank lines and # comments are skipped)")
    from .generate import slug
    taken: set[str] = set()
    for job, name in zip(jobs, names):
        base = slug(name or job.prompt, MAX_NAME)
        job.name, n = base, 1
        while job.name.lower() in taken:  # case-insensitive: unique on every file system
            n += 1
            job.name = f"{base}-{n}"
        taken.add(job.name.lower())
    return jobs


def read_outputs(path: Path) -> dict[str, dict]:
    """The rows of an earlier run's ``manifest.csv`` by ``path`` (empty when there is none)."""
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8", newline="") as f:
        return {row["path"]: row for row in csv.DictReader(f) if row.get("path")}


def write_outputs(path: Path, rows: Sequence[dict]) -> None:
    """``manifest.csv`` (:data:`COLUMNS`), written atomically."""
    from .io import atomic_write_text
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def output_row(job: Job, seed: int, neighbours: list[dict]) -> dict:
    """One manifest row: the output, its prompt as caption, the seed, and the neighbours used (captions joined
    by `` | ``, database ids and scores by spaces); ``label``: the CSV row's, else empty."""
    return {"path": f"{job.name}.wav", "caption": job.prompt, "seed": seed,
            "label": job.label,
            "neighbours": " | ".join(n["caption"] for n in neighbours),
            "neighbour_ids": " ".join(str(n.get("id", "")) for n in neighbours),
            "neighbour_scores": " ".join(f"{n['score']:.4f}" for n in neighbours)}


def _config_change(old: dict, new: dict, prefix: str = "") -> str | None:
    """The first key whose value differs between two configurations (dotted), or None."""
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _config_change(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}: {a!r} -> {b!r}"
    return None


def _neighbours(pipe, prompt: str) -> list[dict]:
    """The neighbours a generation of ``prompt`` conditions on (for an output whose manifest row was lost)."""
    from .pipeline import clean_prompt
    if pipe.database is None or pipe.cfg["generation"]["retrieval"] == "none":
        return []
    k = min(pipe.cfg["generation"]["k"], len(pipe.database))
    return pipe.retrieve(pipe.text_encoder.embed([clean_prompt(prompt)[0]]), k)[0]


def run_batch(args, prompts: Sequence[str], overrides: Sequence[str], shown: set[str] | None = None) -> int:
    """``reaudio generate --prompts FILE -o DIR [flags] [key=value ...]`` (module docstring)."""
    import yaml
    from tqdm.auto import tqdm

    from .audio import save_wav
    from .io import check_writable
    from .config import CONFIG_FILE
    from .generate import flag_overrides, load_pipeline, print_notes
    from .io import atomic_write_text
    if prompts:
        raise ReaudioError(f"give prompts either as words or in --prompts FILE, not both (got {prompts[0]!r} and "
                           f"--prompts {args.prompts})")
    out = Path(args.output)
    if out.suffix.lower() == ".wav":
        raise ReaudioError(f"--prompts writes one WAV per prompt: -o must be a folder, not {out}")
    jobs = read_prompts_file(args.prompts)
    shown = set() if shown is None else shown
    check_writable(out, "-o", folder=True)
    pipe = load_pipeline(args, list(overrides) + flag_overrides(args))
    saved = out / CONFIG_FILE
    if saved.is_file():
        change = _config_change(yaml.safe_load(saved.read_text(encoding="utf-8")) or {}, pipe.cfg)
        if change:
            raise ReaudioError(f"{out} holds outputs of another configuration ({change}); resume with the same "
                               "command, or write to another folder")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, yaml.safe_dump(pipe.cfg, sort_keys=False))
    earlier = read_outputs(out / MANIFEST)
    rows, made, kept = [], 0, 0
    bar = tqdm(jobs, desc="prompts", unit="prompt", disable=args.quiet)
    for job in bar:
        seed = pipe.cfg["generation"]["seed"] if job.seed is None else job.seed
        wav = out / f"{job.name}.wav"
        before = earlier.get(wav.name)
        same = before is None or (before.get("caption") == job.prompt and str(before.get("seed")) == str(seed))
        if wav.is_file() and same:  # done by an earlier run: kept, with what that run recorded (else its neighbours)
            rows.append({**before, "path": wav.name} if before else output_row(job, seed, _neighbours(pipe, job.prompt)))
            kept += 1
            continue
        if wav.is_file():
            log.info("%s was made from %r (seed %s); remade for %r (seed %s)", wav, before.get("caption"),
                     before.get("seed"), job.prompt, seed)
        result = pipe([job.prompt], seed=seed, progress=False)
        print_notes(result.warnings, shown)
        save_wav(wav, result.waveforms[0], result.sample_rate)
        if args.png:
            from .plots import save_mel_png
            save_mel_png(wav.with_suffix(".png"), result.mels[0], job.prompt,
                         [n["caption"] for n in result.neighbours[0]])
        rows.append(output_row(job, seed, result.neighbours[0]))
        made += 1
        write_outputs(out / MANIFEST, rows + [r for r in earlier.values() if r["path"] not in {x["path"] for x in rows}])
    write_outputs(out / MANIFEST, rows)
    print(f"{out}: {made} generated, {kept} already there (skipped), {len(rows)} in {out / MANIFEST}")
    return 0
