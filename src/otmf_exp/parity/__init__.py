"""Parity: our methods against the reference code (FusionBench in its own venv, the authors' repos)."""
