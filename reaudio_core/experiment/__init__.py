"""``reaudio experiment --config FILE``: train, generate and evaluate a grid of variants (the paper's
Table 1, Fig. 3 and Fig. 4 protocol), resumably.

One run, top to bottom (:func:`run_experiment`):

    experiment YAML -> plan (variants x seeds; which trainings they need)
        -> prepare (e.g. the VAE, reused when its final/ exists) -> retrieval database (OUT/db)
        -> training subset (long-tailed per-class counts -> training.include_ids)
        -> one LDM training per distinct training config (OUT/train/<slug>-<hash>/)
        -> generation per variant and seed (OUT/gen/<variant>/<seed>/<name>.wav)
        -> evaluation per cell (OUT/eval/<variant>/seed-<seed>.json; reaudio_core.evaluation)
        -> OUT/results.json, OUT/table.md, OUT/k_sweep.png, OUT/longtail-<score>.png

Every cell is keyed by a hash of everything it depends on; a rerun skips cells whose key matches
(trainings resume from their last checkpoint, generation keeps every clip already written, each
write is atomic), so an interrupted run loses at most the clip or training steps in flight.
``--dry-run`` checks the configuration, data files and weights and prints the plan without computing.

The experiment file format is documented in docs/experiments.md; shipped examples are in
configs/experiments/. Paths are relative to the working directory (run from the repository root, as
for ``reaudio train``); ``{out}`` in any string is replaced by the output directory.

Modules: :mod:`.spec` (the file, its defaults, loading), :mod:`.plan` (variants, trainings, subset,
prompts), :mod:`.check` (the dry run), :mod:`.run` (running the cells), :mod:`.report` (aggregation,
table.md, plots).
"""
from .check import check_plan, describe_plan
from .plan import Plan, Prompt, Training, Variant, build_plan, select_prompts, select_subset
from .report import plot_k_sweep, plot_longtail, summarise, table_markdown
from .run import run_experiment
from .spec import DEFAULTS, load_experiment

__all__ = ["DEFAULTS", "Plan", "Prompt", "Training", "Variant", "build_plan", "check_plan", "describe_plan",
           "load_experiment", "plot_k_sweep", "plot_longtail", "run_experiment", "select_prompts", "select_subset",
           "summarise", "table_markdown"]
