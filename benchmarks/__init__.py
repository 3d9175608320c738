"""Benchmarks of a source checkout (not part of the installed package): `reaudio bench NAME` imports
``benchmarks.NAME`` and calls its ``main(argv)``; `python -m benchmarks.NAME` (from the checkout's root)
runs the same."""
