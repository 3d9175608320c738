"""Engine swap: one denoiser call in torch fp32 eager against ONNX Runtime, at batch 1 (issue 23, item 7).

Two UNets, each called once per step at batch 1 the way a guidance-distilled student calls it (the student is
the same UNet plus one small Linear for the guidance scale, which costs nothing beside it):

* ``offline``: the shipped offline preset's UNet (``unet-ldm``, its ``high`` expert; both experts have one
  size), on the conditioning the preset builds for 'a dog barks' (k=3) and its 5.12 s latent;
* ``s``: an S-size ``unet-ldm`` with both retrieval streams (registry.yaml's defaults, random weights, seed 0),
  a 10.24 s latent, random conditioning of the generation benchmark's lengths (k=3: 3 x 16 caption tokens,
  3 x 32 audio tokens).

Each UNet is exported with ``torch.onnx.export`` (TorchScript exporter, opset 17) of a thin wrapper module and
run with ONNX Runtime's CPU provider (all graph optimisations; its idle threads do not spin, so they take
no core from the torch call that follows). Both engines use ``--threads`` threads (default
2); the calls are interleaved (torch, ORT, torch, ORT, ...) after one warm-up each, and the table gives medians.
The load average is recorded before and after. The issue's rule: no engine swap unless ONNX Runtime is at
least 1.5x faster. ONNX Runtime is not a dependency of reaudio: ``pip install onnxruntime onnx`` to run this.
Writes ``benchmarks/results/engines.md``.

    python -m benchmarks.engines [--repeats 5] [--threads 2] [--sizes offline,s]     # or: reaudio bench engines
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from reaudio_core.interfaces import Conditioning
from reaudio_core.io import atomic_write_text

REQUIRED_SPEEDUP = 1.5  #: issue 23, item 7
INPUTS = ("latents", "timesteps", "prompt", "captions", "caption_mask", "audio", "audio_mask")


class DenoiserCall(torch.nn.Module):
    """A denoiser's ``__call__`` on plain tensors (what the exporter traces)."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser = denoiser
        self.model = denoiser.model  # its parameters, registered here for the exporter

    def forward(self, latents, timesteps, prompt, captions, caption_mask, audio, audio_mask):
        return self.denoiser(latents, timesteps, Conditioning(prompt, captions, caption_mask, audio, audio_mask))


def offline_case() -> tuple[object, dict, str]:
    """The shipped offline UNet and the inputs of one of its batch-1 calls."""
    from reaudio_core.pipeline import ReAudioPipeline
    from reaudio_core.registry import get_registry
    pipe = ReAudioPipeline.from_preset("offline")
    cond, _, _ = pipe.condition(["a dog barks"], pipe.cfg["generation"]["k"])
    shape = pipe.latent_shape(pipe.cfg["generation"]["duration"])
    root = pipe.model_dir / "denoiser" / "high"
    unet = get_registry().spec("denoiser", "unet-ldm").cls.from_pretrained(root)  # unchecked: the bare call
    g = torch.Generator().manual_seed(0)
    inputs = {"latents": torch.randn(1, *shape, generator=g), "timesteps": torch.tensor([500]),
              "prompt": cond.prompt, "captions": cond.captions, "caption_mask": cond.caption_mask,
              "audio": cond.audio, "audio_mask": cond.audio_mask}
    return unet, inputs, "shipped offline UNet (unet-ldm, trained weights), 5.12 s latent"


def s_case() -> tuple[object, dict, str]:
    """An S-size retrieval UNet with random weights and random batch-1 inputs for a 10.24 s clip."""
    from reaudio_core.registry import get_registry
    reg = get_registry()
    torch.manual_seed(0)
    unet = reg.spec("denoiser", "unet-ldm").cls(**reg.resolve_params("denoiser", "unet-ldm", {"size": "s"}))
    g = torch.Generator().manual_seed(0)
    frames = 1024 // 4  # 10.24 s = 1024 mel frames, the VAE's x4
    inputs = {"latents": torch.randn(1, unet.in_channels, frames, 16, generator=g), "timesteps": torch.tensor([500]),
              "prompt": torch.randn(1, unet.prompt_dim, generator=g),
              "captions": torch.randn(1, 48, unet.text_dim, generator=g), "caption_mask": torch.ones(1, 48, dtype=torch.bool),
              "audio": torch.randn(1, 96, unet.audio_dim, generator=g), "audio_mask": torch.ones(1, 96, dtype=torch.bool)}
    params = sum(p.numel() for p in unet.model.parameters()) / 1e6
    return unet, inputs, f"S-size unet-ldm with both retrieval streams ({params:.0f} M parameters, random weights), 10.24 s latent"


CASES = {"offline": offline_case, "s": s_case}


def measure(name: str, repeats: int, thread_counts: list[int], ort) -> list[dict]:
    """One row per thread count: the case exported once, then timed at each count."""
    unet, inputs, what = CASES[name]()
    call = DenoiserCall(unet).eval()
    args = tuple(inputs[k] for k in INPUTS)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / f"{name}.onnx")
        t0 = time.perf_counter()
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(call, args, path, input_names=list(INPUTS), output_names=["out"], opset_version=17,
                              dynamo=False)
        export_s = time.perf_counter() - t0
        rows = []
        for threads in thread_counts:
            rows.append({"case": name, "what": what, "latent": list(inputs["latents"].shape), "export_s": export_s,
                         "threads": threads, **_time(call, args, inputs, path, threads, repeats, ort)})
    return rows


def _time(call, args, inputs, path, threads, repeats, ort) -> dict:
    """Interleaved torch / ONNX Runtime calls at ``threads`` threads, after one warm-up each."""
    torch.set_num_threads(threads)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle ORT threads must not spin
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}  # the exporter drops unused inputs

    def run_torch():
        with torch.inference_mode():
            return call(*args)

    def run_ort():
        return session.run(None, feed)[0]

    ref, got = run_torch(), run_ort()  # warm-up, and the outputs compared
    diff = float((ref - torch.from_numpy(got)).abs().max())
    times = {"torch": [], "ort": []}
    for _ in range(repeats):
        for engine, fn in (("torch", run_torch), ("ort", run_ort)):
            t0 = time.perf_counter()
            fn()
            times[engine].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"max_abs_diff": diff, "times": times, "median": med, "speedup": med["torch"] / med["ort"]}


def decision(rows: list[dict], load: tuple) -> list[str]:
    """Per UNet, whether ONNX Runtime reaches the issue's bar at the thread counts measured; a caveat on a busy
    machine, where torch's multi-threaded calls slow down many-fold under contention and ORT's do not."""
    lines = []
    for case in dict.fromkeys(r["case"] for r in rows):
        mine = [r for r in rows if r["case"] == case]
        ratios = ", ".join(f"{r['speedup']:.2f}x at {r['threads']} thread(s)" for r in mine)
        met = [r for r in mine if r["speedup"] >= REQUIRED_SPEEDUP]
        verdict = ("at least 1.5x at every thread count measured" if len(met) == len(mine) else
                   "below 1.5x at every thread count measured: no engine swap" if not met else
                   f"at least 1.5x only at {', '.join(str(r['threads']) for r in met)} thread(s)")
        lines.append(f"- {case}: ONNX Runtime {ratios}: {verdict}.")
    busiest = max(load[0][0], load[1][0])
    if busiest > (os.cpu_count() or 1):
        lines.append(f"- The machine was busy (load average up to {busiest} on {os.cpu_count()} cores): torch's "
                     "OpenMP threads slow down many-fold when they share cores with other work (docs: `--threads`), "
                     "ONNX Runtime's non-spinning threads far less, so ratios at more than one thread here measure "
                     "contention as much as the engine. Rerun on a quiet machine before acting on them.")
    return lines


def report(rows: list[dict], repeats: int, load: tuple, versions: str) -> str:
    lines = ["# Engine swap: one batch-1 denoiser call, torch fp32 eager vs ONNX Runtime", "",
             "Command: `reaudio bench engines` (benchmarks/engines.py; `pip install onnxruntime onnx` first, not a "
             "reaudio dependency).", "",
             f"{versions}; the same thread count for both engines; {repeats} interleaved calls each after one "
             f"warm-up; medians. Load average (1, 5, 15 min) before: {load[0]}, after: {load[1]} on "
             f"{os.cpu_count()} cores.", "",
             "| UNet | latent | threads | torch eager (s) | ONNX Runtime (s) | speed-up | max abs diff | export (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['what']} | {'x'.join(map(str, r['latent']))} | {r['threads']} | {r['median']['torch']:.3f} | "
                     f"{r['median']['ort']:.3f} | {r['speedup']:.2f}x | {r['max_abs_diff']:.1e} | {r['export_s']:.0f} |")
    lines += ["", f"Against the issue's bar (issue 23 item 7: no engine swap unless at least {REQUIRED_SPEEDUP}x):", "",
              *decision(rows, load), "", "Every call (s):", ""]
    for r in rows:
        for engine, ts in r["times"].items():
            lines.append(f"- {r['case']}, {r['threads']} thread(s), {engine}: {', '.join(f'{t:.3f}' for t in ts)}")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="reaudio bench engines", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", default="2", help="comma-separated thread counts, e.g. 1,2 (default 2)")
    ap.add_argument("--sizes", default="offline,s", help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s]
    threads = [int(t) for t in args.threads.split(",") if t.strip().isdigit()]
    unknown = [s for s in sizes if s not in CASES]
    if unknown or not sizes or args.repeats < 1 or not threads or min(threads) < 1:
        ap.error(f"--sizes of {', '.join(CASES)}, --repeats and --threads (a list) at least 1")
    try:
        import onnxruntime as ort
    except ImportError:
        print("reaudio bench engines needs ONNX Runtime, which reaudio does not depend on: "
              "pip install onnxruntime onnx", file=sys.stderr)
        return 2
    before = tuple(round(x, 2) for x in os.getloadavg())
    rows = []
    for name in sizes:
        for r in measure(name, args.repeats, threads, ort):
            rows.append(r)
            print(f"{name}, {r['threads']} thread(s): torch {r['median']['torch']:.3f} s, onnxruntime "
                  f"{r['median']['ort']:.3f} s, {r['speedup']:.2f}x (max abs diff {r['max_abs_diff']:.1e})", flush=True)
    after = tuple(round(x, 2) for x in os.getloadavg())
    versions = f"torch {torch.__version__}, onnxruntime {ort.__version__}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "engines.md", report(rows, args.repeats, (before, after), versions))
    print(f"wrote {out / 'engines.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
