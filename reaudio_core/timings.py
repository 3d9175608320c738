"""A stage timer for one command: where the wall time of ``reaudio generate`` goes.

:func:`mark` ``(stage)`` books the wall time since the previous mark to ``stage`` (added up when a
stage is marked again). The first mark of a process first books ``start``: the process's age at that
moment (interpreter start-up and the imports before the command ran; Linux ``/proc``, left out
elsewhere); a command starts its table with :func:`begin`. ``reaudio generate`` marks ``build`` (configuration, lazy imports, models, weights),
the pipeline ``condition``, ``denoise``, ``decode``, ``vocode``, and the command ``write``;
``--timings`` prints the table (:func:`report`), otherwise it goes to the ``reaudio`` logger at DEBUG.
Cheap enough to be always on: one ``perf_counter`` per mark.
"""
from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("reaudio")

_stages: dict[str, float] = {}
_last: float | None = None
_begun = False  #: whether a command of this process has called begin()


def process_age() -> float | None:
    """Seconds since this process started (Linux ``/proc``), or None where that cannot be read."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rpartition(")")[2].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time in clock ticks after boot
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def mark(stage: str) -> None:
    """Book the wall time since the previous mark (the first: since the process started) to ``stage``."""
    global _last
    now = time.perf_counter()
    if _last is None:
        age = process_age()
        if age is not None:
            _stages["start"] = age
    else:
        _stages[stage] = _stages.get(stage, 0.0) + now - _last
    _last = now


def begin() -> None:
    """Start a command's table afresh: its ``start`` is the process's age for the first command of the process
    (interpreter start-up and imports included), 0 for a later one (``main()`` called again in one process)."""
    global _begun, _last
    first = not _begun
    reset()
    _begun = True
    if first:
        mark("start")
    else:
        _stages["start"], _last = 0.0, time.perf_counter()


def stages() -> dict[str, float]:
    """``{stage: seconds}`` in the order first marked."""
    return dict(_stages)


def reset() -> None:
    global _last
    _stages.clear()
    _last = None


def table(times: dict[str, float] | None = None) -> str:
    """The stages as a two-column text table with their total."""
    times = stages() if times is None else times
    rows = [f"{name:<10} {seconds:8.3f} s" for name, seconds in times.items()]
    return "\n".join(["stage      wall time", *rows, f"{'total':<10} {sum(times.values()):8.3f} s"])


def report(last: str, show: bool) -> None:
    """Mark ``last``, then print the table to stderr (``show``) or log it at DEBUG."""
    mark(last)
    if show:
        import sys
        print(table(), file=sys.stderr)
    else:
        log.debug("stage timings:\n%s", table())
