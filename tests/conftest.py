"""Shared fixtures: compose configs in-process; the offline zoo is built once (cached)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from otmf_exp.config import register_configs  # noqa: E402

register_configs()


@pytest.fixture
def make_cfg():
    """``make_cfg(*overrides)`` composes ``run.yaml`` like the command line would."""

    def _make(*overrides: str):
        with initialize_config_module(config_module="otmf_exp.conf", version_base="1.3"):
            return compose(config_name="run", overrides=["progress=false", *overrides])

    return _make


@pytest.fixture(scope="session")
def zoo():
    from otmf_exp.zoo import DigitsZoo

    z = DigitsZoo(progress=False)
    z.build()
    return z


@pytest.fixture
def run_cfg(make_cfg, tmp_path: Path, zoo):
    """Run one experiment in-process in a temp dir; returns (metrics, out_dir)."""
    from otmf_exp.runner import run_experiment

    def _run(*overrides: str):
        out = tmp_path / "run"
        cfg = make_cfg(*overrides)
        return run_experiment(cfg, out), out

    return _run
