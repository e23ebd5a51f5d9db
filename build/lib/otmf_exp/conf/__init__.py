"""Hydra configs of otmf_exp (repository root conf/, shipped in the wheel as the package otmf_exp.conf)."""
