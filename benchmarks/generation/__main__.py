"""`python -m benchmarks.generation [flags]`: the generation benchmark (see the package's docstring)."""
from reaudio_core.registry import ReaudioError

from benchmarks.generation import main

if __name__ == "__main__":
    try:
        main()
    except ReaudioError as exc:
        raise SystemExit(f"error: {exc}") from None
