"""Teacher against a distilled student, end to end per stage, in one run (``--student``).

The teacher is the size's pipeline as the rest of the benchmark runs it (``--target-steps`` DPM-Solver++ steps,
classifier-free guidance batched: one UNet call on 2 rows per step). The student is what ``reaudio distill``
makes of it: the same UNet plus the guidance input (``guidance_embedding: 256``), random weights like the
teacher's, sampled with ``ddim-trailing`` at 4 and 8 steps, one UNet call on 1 row per step. Quality is not
measured here (random weights); docs/results.md ("offline-fast") measures the trained student. At S size the
4-step student is also run with Griffin-Lim in place of HiFi-GAN, the other half of the light path."""
from __future__ import annotations

from pathlib import Path

from reaudio_core.registry import create

from .cases import build_pipeline, run_e2e
from .constants import SIZE_DEFAULTS, TARGET_CLIP, TARGET_SECONDS

STUDENT_STEPS = (4, 8)
STAGES = ("unet", "loop rest", "vae", "vocoder")


def student_of(teacher):
    """A guidance-input copy of a unet-ldm teacher (its weights, the guidance projection at zero)."""
    student = create("denoiser", "unet-ldm", **{**teacher.params, "guidance_embedding": 256})
    missing, unexpected = student.model.load_state_dict(teacher.model.state_dict(), strict=False)
    assert missing == ["time_embedding.cond_proj.weight"] and not unexpected, (missing, unexpected)
    return student


def bench_student(size: str, args, work: Path) -> dict:
    duration = args.duration or SIZE_DEFAULTS[size]["duration"]
    pipe, info = build_pipeline(size, args.encoders, duration, args.target_steps, work / f"student-{size}")
    teacher, hifigan = pipe.denoiser, pipe.vocoder
    student = student_of(teacher)
    variants = [(f"teacher: {args.target_steps} DPM-Solver++ steps, guidance batched (2 rows per call)", teacher,
                 hifigan, "dpm-solver", args.target_steps)]
    variants += [(f"student: {n} ddim-trailing steps, one call (1 row)", student, hifigan, "ddim-trailing", n)
                 for n in STUDENT_STEPS]
    if size != "tiny" and pipe.cfg["vocoder"]["name"] != "griffin-lim":
        variants.append((f"student: {STUDENT_STEPS[0]} steps + Griffin-Lim instead of {pipe.cfg['vocoder']['name']}",
                         student, create("vocoder", "griffin-lim"), "ddim-trailing", STUDENT_STEPS[0]))
    runs = {v[0]: [] for v in variants}
    for label, den, voc, sampler, steps in variants:  # untimed warm-up of each
        pipe.denoiser, pipe.vocoder = den, voc
        run_e2e(pipe, 1, sampler=sampler)
    for _ in range(args.repeats):  # interleaved
        for label, den, voc, sampler, steps in variants:
            pipe.denoiser, pipe.vocoder = den, voc
            runs[label].append(run_e2e(pipe, steps, sampler=sampler)[0])
    pipe.denoiser, pipe.vocoder = teacher, hifigan
    rows = []
    for label, _, _, sampler, steps in variants:
        order = sorted(runs[label], key=lambda r: r["total"])
        row = order[(len(order) - 1) // 2]
        rows.append({"variant": label, "sampler": sampler, "steps": steps, "total": row["total"],
                     "totals": [r["total"] for r in runs[label]], "unet_calls": row["unet_calls"],
                     "unet_step": row["unet_step"], **{s: row["stages"][s] for s in STAGES},
                     "rest": row["total"] - sum(row["stages"][s] for s in STAGES)})
    return {"size": size, "duration": duration, "params_m": info["params_m"], "rows": rows, "repeats": args.repeats}


def markdown(results: list[dict]) -> list[str]:
    """The teacher/student table and, at S size, what the student path reaches against the physical target."""
    if not results:
        return []
    lines = ["## Teacher against distilled student (end to end, per stage)", "",
             __doc__.split("\n\n", 1)[1].replace("\n", " ").strip(), "",
             "| size | variant | UNet calls | UNet s/call | UNet | loop rest | VAE | vocoder | rest | end to end "
             "(median) | speed-up |", "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for res in results:
        base = res["rows"][0]["total"]
        for r in res["rows"]:
            lines.append(f"| {res['size']} | {r['variant']} | {r['unet_calls']} | {r['unet_step']:.3f} | {r['unet']:.2f} "
                         f"| {r['loop rest']:.3f} | {r['vae']:.2f} | {r['vocoder']:.2f} | {r['rest']:.2f} "
                         f"| {r['total']:.2f} | {base / r['total']:.1f}x |")
    s = next((r for r in results if r["size"] == "s"), None)
    if s is not None:
        best = min(s["rows"][1:], key=lambda r: r["total"])
        parts = ", ".join(f"{k} {best[k]:.2f} s" for k in ("unet", "vae", "vocoder", "rest"))
        verdict = "MET" if best["total"] <= TARGET_SECONDS else "NOT MET"
        lines += ["", f"- **{verdict}**: the fastest student path makes a {TARGET_CLIP} s clip at S size in "
                  f"{best['total']:.2f} s ({best['variant']}) against the {TARGET_SECONDS:g} s target; "
                  f"the time goes to {parts}."]
    return lines + [""]
