"""Time and memory of every method at real model size, measured through the runner users run (scripts/bench.py)."""
