"""Generation benchmark on CPU: where the time of one generation goes, and how close it is to real time.

Sizes (random weights throughout: no pretrained weights are needed or loaded)

  tiny  the ``tiny`` preset (UNet ``tiny``, VAE [8, 16, 16], Griffin-Lim with 4 iterations), 1.28 s clips
  s     reference S sizes (reference sections 2-3): UNet ``s`` (128 x [1, 2, 3, 5], 2 res blocks, head
        width 32), VAE [128, 256, 512] x 2 res blocks with 8 latent channels, HiFi-GAN v1 (16 kHz, hop 160),
        10.24 s clips; built from registry.yaml's parameters with random initialisation

Encoders (``--encoders``): ``minilm`` (default) stands in for CLAP (prompt) and T5 (captions) with the
MiniLM text encoder, and uses a random-init AudioMAE (``base`` at S, ``tiny`` at tiny) for retrieved audio;
the UNet's prompt / caption widths follow the encoders (384 / 384 instead of S's 512 / 1024: the
cross-attention key/value projections of the 150 caption tokens are a negligible part of the UNet).
``reference`` uses random-init CLAP (HTSAT-tiny + RoBERTa-base, 512-d), T5-large (1024-d) and AudioMAE
ViT-B at S (their ``tiny`` shapes at tiny), i.e. exactly the S UNet's widths.

Retrieval runs over a small synthetic database (tone-plus-noise clips, one caption each) with its
neighbour features cached (the documented deployment: generation does not run the caption / audio
encoders on neighbours); the uncached encoder costs are timed separately. One prompt, one candidate,
guidance 2.5, DPM-Solver++ unless stated.

Measured, per size:

* end to end (``ReAudioPipeline.__call__``) at the target steps with per-stage times from the same run
  (each component is wrapped by a timing proxy): prompt encoder, retrieval, caption encoder (the
  unconditional empty captions), neighbour features, UNet (per step and all steps), the rest of the
  sampling loop (scheduler, guidance), VAE decode, vocoder; peak RSS;
* this pipeline's denoising loop (``ReAudioPipeline.sample``) against a bare diffusers loop over the same
  UNet module, scheduler and inputs, interleaved in the same run (target ratio <= 1.05);
* classifier-free guidance as one UNet call on 2B against two calls on B (bare loop);
* DPM-Solver++ at the target steps against DDIM (eta 0) at more steps, each compared with the DDIM
  reference of the most steps (final latents and decoded mel);
* precision: fp32, bf16 autocast around the denoiser (``generation.precision=bf16``), and bf16 autocast
  around the denoiser, VAE and vocoder; time and the output mel's difference from fp32. A CPU without
  native bf16 (AVX512-BF16 / AMX) runs bf16 convolutions tens of times slower than fp32: a probe at the
  start detects that, and ``--bf16 auto`` then skips the bf16 runs beyond size tiny (the report says so);
* a steps sweep (end to end).

``--startup`` runs only the start-up section instead (``startup.py``): the offline and offline-fast presets in fresh
processes, its stage timer (``generate --timings``) and ``-X importtime``, beside the 3 s overhead target.

The issue's reference numbers (a bare diffusers loop at S, random weights, measured by the issue's author
on a machine it calls this one) are printed beside the measured S numbers.

    python -m benchmarks.generation [--quick] [--sizes tiny,s] [--steps 10,20,50] [--repeats 3]
                                    [--threads 2] [--encoders minilm|reference] [--bf16 auto|on|off]
                                    [--out DIR]
    reaudio bench generation [same flags]
    reaudio bench generation --startup [--repeats 3] [--threads 2] [--out DIR]
    reaudio bench generation --vocoders [--repeats N] [--threads 2] [--duration S] [--out DIR]

``--vocoders`` runs only the vocoder section (module ``vocoders``): one call of HiFi-GAN V1, Griffin-Lim and
the Vocos-style ``vocos`` at S size, interleaved rounds, into DIR/vocoders.md and DIR/vocoders.json.

Writes DIR/generation.md (the printed report), DIR/generation.json (every number) and DIR/generation.png
(time per stage, stacked; end to end against steps).

The package: ``constants`` (prompt, seed, sizes, targets, the issue's reference numbers), ``measure`` (memory,
bf16 probe, timing proxies, the bare diffusers loop), ``cases`` (what is measured per size), ``report`` (markdown,
plot), ``student`` (``--student``: teacher against a distilled student, per stage, into
generation-student.{md,json}); this module parses the flags, runs the sizes and writes the files.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from reaudio_core.io import atomic_write_text  # noqa: E402

from .cases import bench_size, tasks  # noqa: E402
from .constants import ISSUE_REFERENCE, SIZE_DEFAULTS, TARGET_STEPS  # noqa: E402
from .measure import bf16_probe, cpu_flags  # noqa: E402
from .report import markdown, plot, target_lines  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


# -- main ----------------------------------------------------------------------------------------------
def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="reaudio bench generation", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny size only, 2 steps, 0.64 s clip, 1 repeat, samplers 2/4/8 steps")
    p.add_argument("--sizes", default=None, help="comma-separated sizes: tiny, s (default tiny,s; quick: tiny)")
    p.add_argument("--steps", type=int_list, default=None,
                   help="steps sweep, end to end (default 10,20,50; quick 1,2)")
    p.add_argument("--target-steps", type=int, default=None,
                   help=f"DPM-Solver steps of the main measurements (default {TARGET_STEPS}; quick 2)")
    p.add_argument("--sampler-steps", type=int_list, default=None,
                   help="DPM-Solver steps, then DDIM steps to compare; the last DDIM is the reference "
                        "(default 20,50,200; quick 2,4,8)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement, median kept (default 3; "
                                                             "quick 1)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--duration", type=float, default=None,
                   help="clip seconds for every size (default tiny 1.28, s 10.24; quick 0.64)")
    p.add_argument("--encoders", choices=["minilm", "reference"], default="minilm",
                   help="minilm: MiniLM for prompt and captions (default); reference: random-init CLAP, T5 and "
                        "AudioMAE at the reference sizes")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast variants: auto (default) runs them where the CPU has fast bf16 (probed at the "
                        "start) and at size tiny; on: always (hours at S on a CPU without AVX512-BF16/AMX); off: never")
    p.add_argument("--student", action="store_true",
                   help="only the teacher / distilled-student comparison (benchmarks/generation/student.py) -> "
                        "generation-student.{md,json}")
    p.add_argument("--startup", action="store_true",
                   help="only the start-up section: the offline and offline-fast presets in fresh processes, the stage timer and "
                        "-X importtime (benchmarks/generation/startup.py; writes startup.md, startup.json)")
    p.add_argument("--vocoders", action="store_true",
                   help="only the vocoder section: HiFi-GAN V1, Griffin-Lim and vocos at S size, one call each per "
                        "interleaved round (benchmarks/generation/vocoders.py; writes OUT/vocoders.md and .json)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default benchmarks/results/, with --quick benchmarks/results/quick/)")
    args = p.parse_args(argv)
    q = args.quick
    args.sizes = [s.strip() for s in (args.sizes or ("tiny" if q else "tiny,s")).split(",") if s.strip()]
    for s in args.sizes:
        if s not in SIZE_DEFAULTS:
            p.error(f"unknown size {s!r}: choose from {', '.join(SIZE_DEFAULTS)}")
    args.target_steps = args.target_steps or (2 if q else TARGET_STEPS)
    args.steps = args.steps or ([1, 2] if q else [10, 20, 50])
    args.sampler_steps = args.sampler_steps or ([2, 4, 8] if q else [TARGET_STEPS, 50, 200])
    if len(args.sampler_steps) < 2:
        p.error("--sampler-steps needs DPM-Solver steps and at least one DDIM step count")
    args.repeats = args.repeats or (1 if q else 3)
    args.duration = args.duration or (0.64 if q else None)
    if args.repeats < 1 or args.threads < 1 or args.target_steps < 1:
        p.error("--repeats, --threads and --target-steps must be >= 1")
    if args.duration is not None and args.duration <= 0:
        p.error("--duration must be > 0")
    return args


def run_student(args, out: Path) -> dict:
    from .student import bench_student
    from .student import markdown as student_markdown
    started, load = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="reaudio-bench-student-") as work:
        results = [bench_student(size, args, Path(work)) for size in tqdm(args.sizes, desc="student", file=sys.stderr)]
    total = time.perf_counter() - started
    head = [f"# Generation: teacher against distilled student", "",
            f"{args.threads} torch threads, medians of {args.repeats} interleaved run(s); {total / 60:.1f} min; load "
            f"average {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end. `python -m benchmarks.generation "
            f"--student --sizes {','.join(args.sizes)} --repeats {args.repeats}`.", ""]
    text = "\n".join(head + student_markdown(results))
    print(text)
    atomic_write_text(out / "generation-student.md", text)
    result = {"results": results, "threads": args.threads, "repeats": args.repeats, "total_s": total,
              "load_average": [load[0], os.getloadavg()[0]]}
    atomic_write_text(out / "generation-student.json", json.dumps(result, indent=1, default=str))
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.startup:
        from .startup import run as run_startup
        return run_startup(args, REPO)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        if args.vocoders:
            from . import vocoders
            out = args.out or (REPO / "benchmarks" / "results" / ("quick" if args.quick else ""))
            return vocoders.main(out, args.threads, args.repeats, args.duration)
        return run(args)
    finally:
        torch.set_num_threads(previous_threads)


def run(args) -> dict:
    out = args.out or (REPO / "benchmarks" / "results" / ("quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    if args.student:
        return run_student(args, out)
    started, load = time.perf_counter(), os.getloadavg()
    args.cpu_flags, args.bf16_probe = cpu_flags(), bf16_probe()
    results = []
    with tempfile.TemporaryDirectory(prefix="reaudio-bench-gen-") as work, \
            tqdm(total=sum(tasks(s, args) for s in args.sizes), file=sys.stderr, unit="task") as bar:
        for size in args.sizes:
            results.append(bench_size(size, args, Path(work), bar))
    total = time.perf_counter() - started
    t_lines, status = target_lines(results, args)

    cpu = platform.processor() or "unknown CPU"
    if Path("/proc/cpuinfo").exists():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    import diffusers
    import transformers
    versions = f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}"
    text = markdown(results, args, t_lines, total, load, cpu, versions)
    print(text)
    atomic_write_text(out / "generation.md", text)
    plot(results, out / "generation.png")
    result = {"results": results, "targets": status, "cpu_flags": args.cpu_flags, "bf16_probe": args.bf16_probe,
              "issue_reference": ISSUE_REFERENCE, "threads": args.threads, "repeats": args.repeats,
              "target_steps": args.target_steps, "encoders": args.encoders, "bf16": args.bf16, "quick": args.quick,
              "total_s": total, "load_average": [load[0], os.getloadavg()[0]], "versions": versions, "cpu": cpu}
    atomic_write_text(out / "generation.json", json.dumps(result, indent=1, default=str))
    print(f"# wrote {out / 'generation.md'}, {out / 'generation.png'}, {out / 'generation.json'} in "
          f"{total / 60:.1f} min", file=sys.stderr)
    return result

