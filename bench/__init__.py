"""Load benchmarks of the relay, side by side with the alternatives (``python -m bench``).

Benchmarks are not tests: CI does not run them; tests/test_bench_smoke.py runs every
scenario at a tiny size so they cannot rot.
"""
