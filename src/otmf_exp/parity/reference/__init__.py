"""The reference halves of the parity rows: run in the FusionBench venv, import no otmf_exp but this package."""
