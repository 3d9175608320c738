"""The long-tail report (the paper's Fig. 4): scores grouped by how often a sound class occurs in training.

Three steps, each usable alone:

1. **Count** every class label in the training set: :func:`count_labels` over label lists, read from a
   manifest's label column or a database's items (:func:`labels_from_manifest`, :func:`labels_from_database`).
   Caption corpora without labels (AudioCaps) get labels from :class:`AudioSetMatcher`: AudioSet class names
   found in the caption as whole words, case-insensitively (``matcher.description`` says exactly how; every
   report that uses it repeats that sentence).
2. **Bucket** the counts (:class:`Buckets`): lower edges such as the paper's ``0, 1, 11, 101, 1001``
   ("0", "1-10", "11-100", ...) or, for a small long-tailed ESC-50 subset, ``0, 1, 2, 4, 8``. Bucket "0" is
   the classes never seen in training.
3. **Score** per bucket per model (:func:`bucket_scores`): the mean and count of each per-clip score (KL,
   classifier hit, CLAP cosine, ...) over the evaluated clips whose label falls in the bucket; a clip with
   several labels counts once, in the bucket of its rarest label (``multi_label="min"``) or once per label
   (``"each"``). :func:`plot_buckets` draws the grouped bar chart (matplotlib, Agg).
"""
from __future__ import annotations

import csv
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from .plots import save_figure
from .registry import ReaudioError

#: the paper's frequency buckets (AudioCaps-size training sets)
PAPER_EDGES = (0, 1, 11, 101, 1001)
#: higher is better for these per-clip scores (the plot and the table say which way is better)
HIGHER_IS_BETTER = {"hit": True, "top_prob": True, "clap_cosine": True, "p_label": True, "kl": False}
_TOKEN = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*")


# -- counting -----------------------------------------------------------------------------------------
def count_labels(label_lists: Iterable[Sequence[str] | str | None]) -> Counter:
    """Occurrences of each label: one per clip that carries it (a label repeated in one clip counts once)."""
    counts: Counter = Counter()
    for labels in label_lists:
        if labels is None:
            continue
        if isinstance(labels, str):
            labels = [labels]
        counts.update(set(str(label) for label in labels if label not in (None, "")))
    return counts


def _csv_rows(path: str | Path) -> tuple[list[dict], dict[str, str]]:
    path = Path(path)
    if not path.exists():
        raise ReaudioError(f"CSV not found: {path}")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    cols = {c.strip().lower(): c for c in (rows[0].keys() if rows else [])}
    return rows, cols


def labels_from_manifest(path: str | Path, label_column: str | None = None, caption_column: str | None = None,
                         matcher: "AudioSetMatcher | None" = None) -> list[list[str]]:
    """Per row of a CSV, its labels: the label column (``label`` / ``category`` unless named) or, with a
    ``matcher``, the AudioSet classes matched in the caption column (``caption`` / ``caption_1`` unless named)."""
    rows, cols = _csv_rows(path)
    if matcher is not None:
        col = cols.get((caption_column or "").lower()) or next((cols[c] for c in ("caption", "caption_1") if c in cols),
                                                                None)
        if col is None:
            raise ReaudioError(f"{path}: no caption column ({caption_column or 'caption / caption_1'}); "
                               f"columns: {', '.join(cols)}")
        return [matcher.labels(r.get(col) or "") for r in rows]
    col = cols.get((label_column or "").lower()) or next((cols[c] for c in ("label", "category") if c in cols), None)
    if col is None:
        raise ReaudioError(f"{path}: no label column ({label_column or 'label / category'}); columns: "
                           f"{', '.join(cols)}. For a caption corpus derive labels from AudioSet names "
                           "(--labels audioset)")
    return [[(r.get(col) or "").strip()] if (r.get(col) or "").strip() else [] for r in rows]


def labels_from_database(db, ids: Iterable[int] | None = None, matcher: "AudioSetMatcher | None" = None
                         ) -> list[list[str]]:
    """Per database item (or only ``ids``), its label, or the AudioSet classes matched in its caption."""
    items = db.items if ids is None else [db.items[i] for i in ids]
    if matcher is not None:
        return [matcher.labels(it.get("caption") or "") for it in items]
    return [[it["label"]] if it.get("label") else [] for it in items]


# -- AudioSet names in captions -------------------------------------------------------------------------
def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _alternatives(name: str) -> list[str]:
    """``"Roaring cats (lions, tigers)"`` -> ``["roaring cats"]``; ``"Male speech, man speaking"`` -> both parts.
    Parenthetical qualifiers are dropped, comma-separated synonyms each count, ``etc.`` is ignored."""
    core = re.sub(r"\([^)]*\)", " ", name)
    out = []
    for part in core.split(","):
        words = _tokens(part.replace("etc.", " "))
        if words and words != ["etc"]:
            out.append(" ".join(words))
    return out


class AudioSetMatcher:
    """Labels for free-text captions: AudioSet class names found in the text.

    A class matches when one of its names (the display name split at commas, parenthetical qualifiers
    dropped) occurs in the caption as whole words, case-insensitively, with an optional plural ``s`` / ``es``
    on its last word ("dogs" matches "Dog"; "barking" does not match "Bark"). No stemming, no synonyms
    beyond the ontology's own. Implemented as a lookup of every word n-gram, so 50k captions take seconds.
    """

    def __init__(self, names: Sequence[str], source: str = "AudioSet class names"):
        self.names = list(dict.fromkeys(names))
        self.source = source
        self.phrases: dict[tuple[str, ...], set[str]] = {}
        for name in self.names:
            for alt in _alternatives(name):
                words = alt.split()
                for last in {words[-1], words[-1] + "s", words[-1] + "es"}:
                    self.phrases.setdefault(tuple(words[:-1] + [last]), set()).add(name)
        self.max_n = max((len(p) for p in self.phrases), default=1)

    @classmethod
    def from_dir(cls, directory: str | Path, source: str = "ontology", skip_abstract: bool = True) -> "AudioSetMatcher":
        """From ``ontology.json`` (632 classes; ``abstract`` grouping classes left out unless asked) or
        ``class_labels_indices.csv`` (the 527 labels AudioSet is annotated with)."""
        directory = Path(directory)
        if source == "ontology":
            path = directory / "ontology.json"
            if not path.exists():
                raise ReaudioError(f"AudioSet ontology not found: {path}")
            classes = json.loads(path.read_text(encoding="utf-8"))
            names = [c["name"] for c in classes
                     if not (skip_abstract and "abstract" in (c.get("restrictions") or []))]
            what = (f"AudioSet ontology.json ({len(names)} of {len(classes)} classes"
                    + ("; abstract grouping classes left out)" if skip_abstract else ")"))
        elif source == "labels":
            path = directory / "class_labels_indices.csv"
            rows, cols = _csv_rows(path)
            col = cols.get("display_name")
            if col is None:
                raise ReaudioError(f"{path}: no display_name column")
            names = [r[col] for r in rows]
            what = f"AudioSet class_labels_indices.csv ({len(names)} labels)"
        else:
            raise ReaudioError(f"AudioSet label source must be ontology or labels, got {source!r}")
        return cls(names, what)

    @property
    def description(self) -> str:
        return (f"Labels derived from captions by matching {self.source} names: whole words, case-insensitive, "
                "each comma-separated synonym of a class counts, parenthetical qualifiers dropped, an optional "
                "plural s/es on the last word; no stemming. A caption can get several labels or none.")

    def labels(self, text: str) -> list[str]:
        words = _tokens(text)
        found: set[str] = set()
        for i in range(len(words)):
            for n in range(1, min(self.max_n, len(words) - i) + 1):
                hit = self.phrases.get(tuple(words[i:i + n]))
                if hit:
                    found |= hit
        return sorted(found, key=self.names.index)


# -- buckets --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Buckets:
    """Frequency buckets from ascending lower edges; ``edges[0]`` must be 0 (never seen in training)."""
    edges: tuple[int, ...] = PAPER_EDGES

    def __post_init__(self):
        e = tuple(int(x) for x in self.edges)
        if not e or e[0] != 0 or any(b <= a for a, b in zip(e, e[1:])):
            raise ReaudioError(f"bucket edges must start at 0 and increase strictly, got {list(self.edges)}")
        object.__setattr__(self, "edges", e)

    @property
    def names(self) -> list[str]:
        out = []
        for i, lo in enumerate(self.edges):
            hi = self.edges[i + 1] - 1 if i + 1 < len(self.edges) else None
            out.append(str(lo) if hi == lo else f"{lo}-{hi}" if hi is not None else f">={lo}")
        return out

    def index(self, count: int) -> int:
        idx = 0
        for i, lo in enumerate(self.edges):
            if count >= lo:
                idx = i
        return idx

    def name(self, count: int) -> str:
        return self.names[self.index(count)]


def bucket_of_labels(labels: Sequence[str], counts: Mapping[str, int], buckets: Buckets,
                     multi_label: str = "min") -> list[str]:
    """Bucket name(s) of a clip with ``labels``: of its rarest label (``min``) or of each label (``each``)."""
    if not labels:
        return []
    if multi_label == "min":
        return [buckets.name(min(int(counts.get(label, 0)) for label in labels))]
    if multi_label == "each":
        return list(dict.fromkeys(buckets.name(int(counts.get(label, 0))) for label in labels))
    raise ReaudioError(f"multi_label must be min or each, got {multi_label!r}")


def bucket_scores(items: Sequence[Mapping], counts: Mapping[str, int], buckets: Buckets,
                  scores: Sequence[str], multi_label: str = "min") -> dict:
    """Per bucket: clips, labels and the mean of each per-clip score over the clips that have it.

    ``items``: dicts with ``labels`` (list) and score keys (missing / None scores are skipped).
    Returns ``{"buckets": {name: {"clips", "labels", "<score>": {"mean", "n"}}}, "unlabelled": n}``.
    """
    out = {name: {"clips": 0, "labels": set(), **{s: [] for s in scores}} for name in buckets.names}
    unlabelled = 0
    for it in items:
        labels = list(it.get("labels") or [])
        names = bucket_of_labels(labels, counts, buckets, multi_label)
        if not names:
            unlabelled += 1
            continue
        for name in names:
            b = out[name]
            b["clips"] += 1
            b["labels"].update(label for label in labels
                               if multi_label == "each" or buckets.name(int(counts.get(label, 0))) == name)
            for s in scores:
                v = it.get(s)
                if v is not None and not (isinstance(v, float) and math.isnan(v)):
                    b[s].append(float(v))
    result = {}
    for name, b in out.items():
        entry = {"clips": b["clips"], "labels": sorted(b["labels"])}
        for s in scores:
            vals = b[s]
            entry[s] = {"mean": sum(vals) / len(vals) if vals else None, "n": len(vals)}
        result[name] = entry
    return {"buckets": result, "unlabelled": unlabelled}


def count_table(counts: Mapping[str, int], buckets: Buckets, labels: Iterable[str] | None = None) -> dict:
    """Per bucket, how many classes fall in it (over ``labels``, default every counted label)."""
    labels = list(counts) if labels is None else list(labels)
    table = {name: [] for name in buckets.names}
    for label in labels:
        table[buckets.name(int(counts.get(label, 0)))].append(label)
    return {name: {"classes": len(v), "examples": sorted(v)[:8]} for name, v in table.items()}


# -- plot and markdown ----------------------------------------------------------------------------------
def plot_buckets(path: str | Path, per_model: Mapping[str, dict], score: str, buckets: Buckets,
                 title: str | None = None, ylabel: str | None = None, spread: Mapping[str, Mapping[str, float]] | None = None
                 ) -> Path:
    """Grouped bars like the paper's Fig. 4: x = frequency bucket, one bar per model, y = mean ``score``.

    ``per_model``: model name -> :func:`bucket_scores` result (or its ``buckets`` dict). ``spread``: model ->
    bucket -> error-bar half height (e.g. the std over seeds). Written atomically (temp file, rename).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    names = buckets.names
    models = list(per_model)
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(names) + 0.25 * len(models)), 3.6))
    x = np.arange(len(names))
    for j, model in enumerate(models):
        bk = per_model[model].get("buckets", per_model[model])
        ys = [(bk.get(n) or {}).get(score, {}).get("mean") for n in names]
        ys = [np.nan if y is None else y for y in ys]
        err = None
        if spread and model in spread:
            err = [spread[model].get(n) or 0.0 for n in names]
        ax.bar(x + (j - (len(models) - 1) / 2) * width, ys, width, label=model, yerr=err, capsize=2)
    ax.set_xticks(x)
    ax.set_xticklabels(names)
    ax.set_xlabel("training occurrences of the class (bucket; 0 = unseen)")
    better = HIGHER_IS_BETTER.get(score)
    ax.set_ylabel((ylabel or score) + ("" if better is None else " (higher is better)" if better
                                       else " (lower is better)"))
    if title:
        import textwrap
        ax.set_title("\n".join(textwrap.wrap(title, 70)), fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def _fmt(v, digits=3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def report_markdown(counts: Mapping[str, int], buckets: Buckets, per_model: Mapping[str, dict] | None = None,
                    scores: Sequence[str] = (), label_note: str | None = None, train_source: str = "",
                    labels: Sequence[str] | None = None) -> str:
    """Markdown: classes per bucket, then one table per score (rows = models, columns = buckets).
    ``labels``: the whole label set (e.g. every AudioSet class), so classes never seen land in bucket 0."""
    ct = count_table(counts, buckets, None if labels is None else sorted(set(labels) | set(counts)))
    out = [f"# Long-tail report{f': {train_source}' if train_source else ''}", ""]
    if label_note:
        out += [label_note, ""]
    total = sum(counts.values())
    seen = sum(1 for v in counts.values() if v)
    out += [(f"{seen} of {len(set(labels) | set(counts))} classes" if labels is not None else f"{seen} labels")
            + f" occur in training, {total} label occurrences.", "",
            "| bucket (training occurrences) | classes | examples |", "|---|---|---|"]
    out += [f"| {n} | {ct[n]['classes']} | {'; '.join(ct[n]['examples'])} |" for n in buckets.names]
    for s in scores:
        if not per_model:
            break
        better = HIGHER_IS_BETTER.get(s)
        out += ["", f"## Mean {s} per bucket" + ("" if better is None else f" ({'higher' if better else 'lower'} is "
                                                                          "better)"), "",
                "| model | " + " | ".join(buckets.names) + " |", "|---" * (len(buckets.names) + 1) + "|"]
        for model, res in per_model.items():
            bk = res.get("buckets", res)
            cells = [f"{_fmt(bk[n][s]['mean'])} (n={bk[n][s]['n']})" if bk.get(n) else "n/a" for n in buckets.names]
            out.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def eval_items_with_labels(evaluation: Mapping, labels_by_name: Mapping[str, Sequence[str]],
                           classifier_labels: Sequence[str] | None = None) -> list[dict]:
    """Per-clip scores from a :func:`reaudio_core.evaluation.evaluate` result, with each clip's labels
    (looked up by clip name, e.g. from the prompts CSV) and ``hit`` = the classifier's top class is one of them
    (only where the classifier's label set knows the clip's label)."""
    known = set(classifier_labels or [])
    out = []
    for it in evaluation.get("items", []):
        name = it["name"]
        labels = list(labels_by_name.get(name, labels_by_name.get(Path(name).name, [])) or [])
        row = {"name": name, "labels": labels, "kl": it.get("kl"), "clap_cosine": it.get("clap_cosine"),
               "top_class": it.get("top_class")}
        if "top_class" in it and labels and (not known or any(label in known for label in labels)):
            row["hit"] = 1.0 if it["top_class"] in labels else 0.0
        out.append(row)
    return out


def longtail_report(train: str | Path, *, train_labels: str = "column", edges: Sequence[int] = (0, 1, 11, 101, 1001),
                    evals: Mapping[str, str | Path] | None = None, prompts: str | Path | None = None,
                    prompt_labels: str = "column", multi_label: str = "min", audioset: str | Path | None = None,
                    audioset_source: str = "ontology", out: str | Path | None = None) -> str:
    """``reaudio longtail``: count the labels of ``train`` (a manifest CSV or a database directory), bucket them
    at ``edges`` and, for each ``evals`` entry (model name -> a ``reaudio evaluate --json`` file), score the
    clips per bucket, labelled through the ``prompts`` CSV. ``train_labels`` / ``prompt_labels``: ``column``
    (the label/category column), ``audioset`` (AudioSet names in captions, ontology from ``audioset``) or a
    column name. Returns the markdown report; with ``out``, also writes longtail.md, longtail.json and
    longtail-<score>.png there."""
    matcher = None
    if "audioset" in (train_labels, prompt_labels):
        if audioset is None:
            raise ReaudioError("AudioSet labels need the folder with ontology.json (--audioset DIR)")
        matcher = AudioSetMatcher.from_dir(audioset, audioset_source)
    train = Path(train)
    if train.is_dir():
        from .database import Database
        labels = labels_from_database(Database.open(train), matcher=matcher if train_labels == "audioset" else None)
    else:
        labels = labels_from_manifest(train, label_column=None if train_labels in ("column", "audioset")
                                      else train_labels,
                                      matcher=matcher if train_labels == "audioset" else None)
    counts = count_labels(labels)
    buckets = Buckets(tuple(edges))
    per_model, scores = {}, ("kl", "hit", "clap_cosine")
    if evals:
        if not prompts:
            raise ReaudioError("--eval needs --prompts CSV (file and caption columns, optionally label) to give each "
                               "generated clip its labels")
        from .evaluation import FILE_COLUMNS
        rows, cols = _csv_rows(prompts)
        ncol = next((cols[c] for c in FILE_COLUMNS if c in cols), None)
        if ncol is None:
            raise ReaudioError(f"{prompts}: needs a file column ({'/'.join(FILE_COLUMNS)})")
        labels = labels_from_manifest(prompts, label_column=None if prompt_labels in ("column", "audioset")
                                      else prompt_labels,
                                      matcher=matcher if prompt_labels == "audioset" else None)
        by_name = {Path((r.get(ncol) or "").strip()).with_suffix("").as_posix(): lab for r, lab in zip(rows, labels)}
        for name, path in evals.items():
            res = json.loads(Path(path).read_text(encoding="utf-8"))
            labels_of = (res.get("feature_models") or {}).get("classifier") or {}
            items = eval_items_with_labels(res, by_name, labels_of.get("labels"))
            per_model[name] = bucket_scores(items, counts, buckets, scores, multi_label)
    note = matcher.description if matcher is not None else None
    universe = matcher.names if train_labels == "audioset" else None
    text = report_markdown(counts, buckets, per_model, [s for s in scores if per_model], note, str(train), universe)
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "longtail.md").write_text(text, encoding="utf-8")
        (out / "longtail.json").write_text(json.dumps({"label_note": note, "buckets": buckets.names,
                                                       "counts": dict(counts), "models": per_model}, indent=1))
        for s in scores:
            if any(b[s]["n"] for r in per_model.values() for b in r["buckets"].values()):
                plot_buckets(out / f"longtail-{s}.png", per_model, s, buckets)
    return text
