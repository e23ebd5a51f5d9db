"""otmf_exp: continual model merging experiments (OTMF and baselines)."""

__version__ = "0.1.0"
