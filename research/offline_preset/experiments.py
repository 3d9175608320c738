"""Experiments on what the LDM learned: ``heldout`` (classes left out of training), ``conditional`` (what
each retrieved set trained it to make), ``renoise`` (from which noise level a class is lost) and
``diagnose`` (does the model use its conditions?)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from . import settings
from .checks import _classifier_name, _classifier_stem, _classify, _generate, _n_seeds, _per_class, _score
from .stages import _train_stage


def diagnose(args) -> None:
    """x0 error per timestep on 20 real clips (one every 20 of the 400), conditional vs unconditional."""
    import csv

    import torch

    from reaudio_core import mel as M
    from reaudio_core.audio import load_audio
    from reaudio_core.pipeline import ReAudioPipeline, make_scheduler, prediction_type
    pipe = (ReAudioPipeline.from_pretrained(args.model, db=settings.RUNS / "esc50-db") if args.model
            else ReAudioPipeline.from_preset("offline"))
    rows = list(csv.DictReader(open(settings.DATA / "metadata.csv", encoding="utf-8")))[::20]
    frames = M.seconds_to_frames(pipe.cfg["generation"]["duration"])
    with torch.no_grad():  # the training front end: normalise, pad to the generation length, log-mel, encode
        z0 = torch.cat([pipe.decoder.encode(M.waveform_to_mel(load_audio(settings.DATA / r["file"]), frames))
                        for r in rows])
        mu, var = z0.mean((0, 2, 3), keepdim=True), z0.var((0, 2, 3), keepdim=True)
        cond, uncond, _ = pipe.condition([r["category"].replace("_", " ") for r in rows], pipe.cfg["generation"]["k"])
        sched = make_scheduler(pipe.cfg, "ddim")
        sched.set_timesteps(sched.config.num_train_timesteps)  # step() below only for its x0 estimate
        g = torch.Generator().manual_seed(0)
        print(f"model: {args.model or 'shipped offline preset'} ({prediction_type(pipe.cfg)}); {len(rows)} real "
              "clips; x0 MSE per element")
        print("| t | alpha_bar | conditional | unconditional | Gaussian prior (per-channel mean/var) |")
        print("|---|---|---|---|---|")
        for t in (999, 900, 800, 700, 600, 500, 400, 300, 200, 100, 50):
            a = sched.alphas_cumprod[t]
            ts = torch.full((len(z0),), t)
            zt = sched.add_noise(z0, torch.randn(z0.shape, generator=g), ts)
            errs = [((sched.step(pipe.denoiser(zt, ts, c), t, zt).pred_original_sample - z0) ** 2).mean().item()
                    for c in (cond, uncond)]
            prior = mu + (a.sqrt() * var / (a * var + 1 - a)) * (zt - a.sqrt() * mu)
            print(f"| {t} | {a:.5f} | {errs[0]:.3f} | {errs[1]:.3f} | {((prior - z0) ** 2).mean():.3f} |")


def heldout(args) -> None:
    import numpy as np

    from reaudio_core.pipeline import ReAudioPipeline
    # the first three shipped LDM stages (epsilon, v, annealed; not the pool-7 stage), each without the
    # held-out classes and starting from the held-out stage before it
    excl = "[" + ",".join(settings.HELDOUT_CLASSES) + "]"
    steps = [args.heldout_steps, args.heldout_v_steps, args.heldout_anneal_steps]
    out = None
    for (config, name), n in zip(settings.LDM_STAGES[:3], steps):
        start = [f"denoiser.params.checkpoint={out / 'final' / 'denoiser'}"] if out else []
        out = settings.RUNS / f"{name}-heldout"
        _train_stage(config, out, f"training.exclude_labels={excl}", *start, f"training.max_steps={n}",
                     procs=args.procs)
    settings.RESULTS.mkdir(parents=True, exist_ok=True)
    prompts = [c.replace("_", " ") for c in settings.HELDOUT_CLASSES]
    seeds = list(range(_n_seeds(args, 4)))
    targets = [c for _ in seeds for c in settings.HELDOUT_CLASSES]
    results = {"excluded_classes": settings.HELDOUT_CLASSES, "seeds": seeds, "clips_per_setting": len(targets),
               "heldout_training_steps": [args.heldout_steps, args.heldout_v_steps, args.heldout_anneal_steps],
               "classifier": "esc50-classifier", "sample_rate": 16000, "rows": {}}
    # retrieval at generation: the class's own clips retrievable (the bring-your-own-library case), the
    # same database with them hidden (generation.exclude_labels: what the model knows without them), off
    retrievals = {"retrieval on": ("audio+text", []),
                  "retrieval on, class clips hidden": ("audio+text", settings.HELDOUT_CLASSES),
                  "retrieval off": ("none", [])}
    # both models sample with the same guidance: --guidance, else the shipped preset's
    from reaudio_core.config import compose
    guidance = args.guidance if args.guidance is not None else compose("offline")["generation"]["guidance"]
    results["guidance"] = guidance
    t0 = time.time()
    for mname, mdir in (("held-out model", out / "final"), ("full model (shipped preset)", None)):
        pipe = ReAudioPipeline.from_preset("offline") if mdir is None else \
            ReAudioPipeline.from_pretrained(mdir, db=settings.RUNS / "esc50-db")
        pipe.cfg["generation"]["guidance"] = guidance
        for sname, (retrieval, hidden) in retrievals.items():
            pipe.cfg["generation"]["retrieval"], pipe.cfg["generation"]["exclude_labels"] = retrieval, list(hidden)
            nb = []
            labels, probs = _classify(_generate(pipe, prompts, seeds, neighbours=nb))
            s = _score(labels, probs, targets)
            s["per_class_top1"] = _per_class(targets, s["predictions"], settings.HELDOUT_CLASSES)
            # how many retrieved neighbours carry the asked class (0 when hidden or off)
            s["neighbours_of_asked_class"] = float(np.mean([n["label"] == t for t, row in zip(targets, nb)
                                                            for n in row])) if any(nb) else 0.0
            results["rows"][f"{mname} / {sname}"] = s
            print(f"{mname} / {sname}: top-1 {s['top1']:.3f} top-5 {s['top5']:.3f} p {s['p_target']:.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    results["seconds"] = round(time.time() - t0, 1)
    (settings.RESULTS / "offline-heldout.json").write_text(json.dumps(results, indent=2))
    md = [f"Classes excluded from LDM training (clips kept in the retrieval database): "
          f"{', '.join(settings.HELDOUT_CLASSES)}; "
          f"held-out model trained for {args.heldout_steps} epsilon + {args.heldout_v_steps} v + "
          f"{args.heldout_anneal_steps} annealing steps (the full model: 3200 + 3000 + 2000, configs/offline-ldm.yaml, "
          "offline-ldm-v.yaml, offline-ldm-v-anneal.yaml). The VAE (and so the retrieved-audio "
          "encoder) is the shipped one, trained on all 400 clips without labels. "
          f"{len(targets)} clips per row ({len(prompts)} prompts x {len(seeds)} seeds; 5.12 s, 16 kHz, guidance "
          f"{guidance:g}), classified by "
          "esc50-classifier over all 50 classes (chance: top-1 0.02, top-5 0.10). 'class clips hidden' = "
          "generation.exclude_labels set to the 5 classes, so retrieval returns other classes' clips.", "",
          "| model / retrieval at generation | retrieved neighbours of the asked class | top-1 | top-5 | "
          "mean p(asked class) |", "|---|---|---|---|---|"]
    for key, s in results["rows"].items():
        md.append(f"| {key} | {s['neighbours_of_asked_class']:.2f} | {s['top1']:.3f} | {s['top5']:.3f} | "
                  f"{s['p_target']:.3f} |")
    md += ["", "Top-1 per held-out class:", "",
           "| model / retrieval | " + " | ".join(settings.HELDOUT_CLASSES) + " |",
           "|---|" + "---|" * len(settings.HELDOUT_CLASSES)]
    for key, s in results["rows"].items():
        md.append(f"| {key} | " + " | ".join(f"{s['per_class_top1'][c]:.2f}" for c in settings.HELDOUT_CLASSES) + " |")
    (settings.RESULTS / "offline-heldout.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))



def conditional(args) -> None:
    """What the LDM was trained to produce under the conditions each class prompt retrieves.

    Training conditions every clip on its stored top-k neighbours (self excluded); generation retrieves the
    top-k for the prompt. Every ESC-50 clip of a class has the same caption, so the prompt retrieves some
    k of the class's clips and, in training, exactly those k were the neighbours of the class's *other*
    clips: the only clips the model ever learned to make from that condition. If those clips lose their
    class on the way through the VAE and vocoder, a perfect LDM would lose it too. Reads the shipped
    database and the per-clip predictions of ``ceiling`` (run that first). Then (``--seeds`` > 0) each demo
    prompt is generated from every distinct neighbour set its class's clips were trained with, in place of
    what it retrieves: does the model make the clip it was trained to make from that set?"""
    import csv

    import numpy as np

    from reaudio_core.database import Database
    ceiling = json.loads((settings.RESULTS / "offline-ceiling.json").read_text())
    if ceiling.get("model") != "offline preset (plugins/weights/offline)" or "vae" not in ceiling["rows"]:
        raise SystemExit("docs/results/offline-ceiling.json is not the shipped preset's: run `ceiling` first")
    check = json.loads((settings.RESULTS / "offline-check.json").read_text())
    rows = list(csv.DictReader(open(settings.DATA / "metadata.csv", encoding="utf-8")))
    clip_row = {r["file"]: i for i, r in enumerate(rows)}
    db = Database.open(settings.SHIPPED / "db")
    k = int(check["generation"]["k"])
    table = np.asarray(db.neighbours.ids)[:, :k]
    files = [item["file"] for item in db.items]
    heard = {key: [ceiling["rows"][key]["predictions"][clip_row[f]] for f in files] for key in ("vocoder", "vae")}
    generated = check["per_class_top1"]  # one seed per prompt at the preset's settings
    out = {"k": k, "database": "plugins/weights/offline/db", "ceiling": "docs/results/offline-ceiling.json",
           "check": "docs/results/offline-check.json", "classes": {}}
    for cls in generated:
        retrieved = sorted(r["id"] for r in db.retrieve(cls.replace("_", " "), k))
        trained = [i for i in range(len(db)) if sorted(table[i].tolist()) == retrieved]
        out["classes"][cls] = {
            "retrieved": [files[i] for i in retrieved],
            "retrieved_all_of_class": all(db.items[i].get("label") == cls for i in retrieved),
            "trained_targets": [files[i] for i in trained],
            "targets_after_vocoder": [heard["vocoder"][i] for i in trained],
            "targets_after_vae": [heard["vae"][i] for i in trained],
            "vae_share": float(np.mean([heard["vae"][i] == cls for i in trained])) if trained else None,
            "generated_top1": generated[cls]}
    cl = out["classes"]
    zero = [c for c, v in cl.items() if v["vae_share"] == 0]
    pairs = np.array([(v["vae_share"], v["generated_top1"]) for v in cl.values() if v["vae_share"] is not None])
    out["correlation_vae_share_vs_generated"] = float(np.corrcoef(pairs.T)[0, 1])
    sets_md = []
    n_seeds = _n_seeds(args, 4)
    if n_seeds > 0:
        sets_md = _generate_from_trained_sets(db, table, files, heard, range(n_seeds), out)
    (settings.RESULTS / "offline-conditional.json").write_text(json.dumps(out, indent=2))
    md = [f"For each of the 50 class prompts: the k = {k} clips the shipped preset retrieves, the training clips whose "
          f"stored top-{k} neighbours are exactly those (the clips the LDM learned to make from that condition), "
          "and the share of them the classifier still hears as the class after log-mel -> VAE -> Griffin-Lim "
          "(per-clip predictions of docs/results/offline-ceiling.json), beside the shipped model's top-1 for the "
          "prompt (docs/results/offline-check.json, one seed). This table generates nothing.", "",
          "| class | retrieved all of the class | targets | targets heard as the class after the vocoder | "
          "after the VAE | generated top-1 |", "|---|---|---|---|---|---|"]
    for cls, v in sorted(cl.items(), key=lambda kv: (kv[1]["vae_share"] is None, kv[1]["vae_share"] or 0, kv[0])):
        n = len(v["trained_targets"])
        voc = sum(h == cls for h in v["targets_after_vocoder"])
        vae = sum(h == cls for h in v["targets_after_vae"])
        md.append(f"| {cls} | {'yes' if v['retrieved_all_of_class'] else 'no'} | {n} | {voc}/{n} | {vae}/{n} "
                  f"({', '.join(h for h in v['targets_after_vae'] if h != cls) or '-'}) | {v['generated_top1']:.0f} |")
    md += ["", f"Classes whose trained targets all lose their class in the VAE: {', '.join(zero) or 'none'}. "
           f"Correlation over the 50 classes between the VAE share and the generated top-1: "
           f"{out['correlation_vae_share_vs_generated']:.2f} (one seed per prompt, so each generated value is 0 or 1)."]
    md += sets_md
    (settings.RESULTS / "offline-conditional.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))





def renoise(args) -> None:
    """From which noise level does the LDM lose a class? Each real clip of a class is encoded by the model's
    VAE, noised to timestep t0 (``scheduler.add_noise``; t0 = 0: the VAE round trip alone, t0 = 1000: pure
    noise, i.e. plain generation) and denoised from there with the DDIM steps (of ``RENOISE_STEPS``) at or
    below t0 at the preset's guidance, conditioned on what the class prompt retrieves; then decoded, vocoded
    and classified. Low t0 only asks the model for fine detail, high t0 for the whole clip."""
    import csv

    import torch

    from reaudio_core import mel as M
    from reaudio_core.audio import load_audio
    from reaudio_core.pipeline import ReAudioPipeline, make_scheduler
    pipe = ReAudioPipeline.from_preset("offline") if not args.model else ReAudioPipeline.from_pretrained(args.model)
    gen = pipe.cfg["generation"]
    guidance = gen["guidance"] if args.guidance is None else args.guidance
    rows = list(csv.DictReader(open(settings.DATA / "metadata.csv", encoding="utf-8")))
    frames = M.seconds_to_frames(gen["duration"])
    out = {"model": "offline preset (plugins/weights/offline)" if not args.model else str(args.model),
           "classifier": _classifier_name(), "sampler": "ddim", "steps": settings.RENOISE_STEPS, "guidance": guidance,
           "k": gen["k"], "noise_seed": 0, "starts": list(settings.RENOISE_STARTS), "classes": {}}
    t0 = time.time()
    for cls in settings.RENOISE_CLASSES:
        files = [r["file"] for r in rows if r["category"] == cls]
        z0 = pipe.decoder.encode(torch.cat([M.waveform_to_mel(load_audio(settings.DATA / f), frames) for f in files]))
        cond, uncond, _ = pipe.condition([cls.replace("_", " ")], int(gen["k"]))
        n = len(files)
        both = uncond.cat(cond).repeat_interleave(n)
        per = {}
        for start in settings.RENOISE_STARTS:
            sch = make_scheduler(pipe.cfg, "ddim")
            sch.set_timesteps(settings.RENOISE_STEPS)
            steps = [t for t in sch.timesteps if t <= start] if start else []
            noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
            x = z0 if not start else noise if start >= 1000 else \
                sch.add_noise(z0, noise, torch.full((n,), int(steps[0])))
            with torch.inference_mode():
                for t in steps:
                    eps_u, eps_c = pipe.denoiser(torch.cat([x, x]), t.expand(2 * n).long(), both).chunk(2)
                    x = sch.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
                waves = pipe.vocoder(pipe.decoder.decode(x))
            labels, probs = _classify(list(waves))
            per[start] = [labels[i] for i in probs.argmax(-1)]
            print(f"{cls} t0={start}: {sum(p == cls for p in per[start])}/{n} ({time.time() - t0:.0f} s)", flush=True)
        out["classes"][cls] = {"files": files, "predictions": {str(k): v for k, v in per.items()}}
    stem = "offline-renoise" + (f"-{Path(args.model).resolve().parent.name}" if args.model else "") + _classifier_stem()
    (settings.RESULTS / f"{stem}.json").write_text(json.dumps(out, indent=2))
    md = [f"Model: {out['model']}; classifier: {out['classifier']}; 16 kHz, {gen['duration']} s. Each real clip of the "
          f"class encoded by the model's VAE, noised to t0 (noise seed 0) and denoised with the DDIM steps at or below "
          f"t0 of {settings.RENOISE_STEPS} at guidance "
          f"{guidance}, conditioned on what the class prompt retrieves (k = {gen['k']}); t0 = 0 is the VAE round "
          "trip alone, t0 = 1000 starts from pure noise (plain generation from these noises). Cells: clips heard as "
          "the class / clips (the other predictions). Command: `python -m research.offline_preset renoise`.", "",
          "| class | " + " | ".join(f"t0 = {s}" for s in settings.RENOISE_STARTS) + " |",
          "|---|" + "---|" * len(settings.RENOISE_STARTS)]
    for cls, v in out["classes"].items():
        cells = []
        for s_ in settings.RENOISE_STARTS:
            preds = v["predictions"][str(s_)]
            others = sorted({p for p in preds if p != cls})
            cells.append(f"{sum(p == cls for p in preds)}/{len(preds)}" + (f" ({', '.join(others)})" if others else ""))
        md.append(f"| {cls} | " + " | ".join(cells) + " |")
    (settings.RESULTS / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def _generate_from_trained_sets(db, table, files, heard, seeds, out) -> list[str]:
    """Each demo prompt generated (preset settings, ``seeds``) from each distinct stored neighbour set of its
    class's clips instead of its own retrieval; the results go into ``out["trained_sets"]``, markdown back."""
    from reaudio_core.pipeline import ReAudioPipeline
    pipe = ReAudioPipeline.from_preset("offline")
    forced: list[int] = []
    # the prompt embedding still comes from the prompt; only the retrieved items are replaced (no search)
    pipe.retrieve = lambda emb, k: [[{**db.items[i], "id": int(i), "score": float("nan")} for i in forced]
                                    for _ in range(len(emb))]
    out["trained_sets"] = {}
    md = ["", f"Each demo prompt generated from every distinct neighbour set its class's clips were trained with, "
          f"instead of its own retrieval (preset settings, seeds {seeds[0]}-{seeds[-1]}): the clips trained under "
          "that set, how they sound after the VAE, and what the classifier hears in the generations.", "",
          "| prompt | neighbour set | trained to make (after the VAE) | generated, top-1 per seed |",
          "|---|---|---|---|"]
    for prompt, cls in zip(settings.DEMO_PROMPTS, settings.DEMO_CLASSES):
        members = [i for i, item in enumerate(db.items) if item.get("label") == cls]
        sets: dict[tuple, list[int]] = {}
        for i in members:
            sets.setdefault(tuple(sorted(table[i].tolist())), []).append(i)
        rows = []
        for nb, trained in sets.items():
            forced[:] = list(nb)
            waves = _generate(pipe, [prompt], seeds)
            labels, probs = _classify(waves)
            heard_gen = [labels[j] for j in probs.argmax(-1)]
            rows.append({"set": [files[i] for i in nb], "trained_targets": [files[i] for i in trained],
                         "targets_after_vae": [heard["vae"][i] for i in trained], "generated": heard_gen})
            made = ", ".join(f"{Path(files[i]).stem} ({heard['vae'][i]})" for i in trained)
            md.append(f"| {prompt} | {', '.join(Path(files[i]).stem for i in nb)} | {made} | "
                      f"{', '.join(heard_gen)} ({sum(h == cls for h in heard_gen)}/{len(heard_gen)}) |")
            print(md[-1], flush=True)
        out["trained_sets"][prompt] = rows
    return md
