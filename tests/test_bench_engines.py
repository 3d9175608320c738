"""benchmarks/engines.py (issue 23 item 7): the report and the decision against the 1.5x bar, from given timings
(the measurement itself needs onnxruntime, not a dependency, and minutes: `reaudio bench engines`)."""
from __future__ import annotations

from benchmarks import engines


def _row(case, threads, torch_s, ort_s):
    return {"case": case, "what": case, "latent": [1, 8, 128, 16], "export_s": 1.0, "threads": threads,
            "max_abs_diff": 1e-6, "times": {"torch": [torch_s], "ort": [ort_s]},
            "median": {"torch": torch_s, "ort": ort_s}, "speedup": torch_s / ort_s}


def test_decision_per_unet_against_the_bar():
    quiet = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    rows = [_row("offline", 1, 0.3, 0.1), _row("offline", 2, 0.2, 0.1), _row("s", 1, 3.0, 2.5), _row("s", 2, 3.0, 1.0)]
    lines = engines.decision(rows, quiet)
    assert lines[0] == "- offline: ONNX Runtime 3.00x at 1 thread(s), 2.00x at 2 thread(s): at least 1.5x at every thread count measured."
    assert lines[1].endswith("at least 1.5x only at 2 thread(s).")
    assert len(lines) == 2  # no busy-machine caveat


def test_busy_machine_is_named_and_no_swap_below_the_bar():
    busy = ((99.0, 1, 1), (1, 1, 1))
    lines = engines.decision([_row("s", 1, 1.1, 1.0)], busy)
    assert lines[0].endswith("below 1.5x at every thread count measured: no engine swap.")
    assert "busy" in lines[1]
    text = engines.report([_row("s", 1, 1.1, 1.0)], 1, busy, "torch x")
    assert "| s | 1x8x128x16 | 1 | 1.100 | 1.000 | 1.10x |" in text
