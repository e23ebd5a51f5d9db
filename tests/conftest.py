"""Shared fixtures: compose configs in-process; the offline zoo is built once (cached)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# Tiny models: one intra-op thread is as fast as two, and two threads per process on a shared
# 2-core box spin-wait (measured: up to 100x slower). Subprocesses inherit OMP_NUM_THREADS.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)

from otmf_exp.config import register_configs  # noqa: E402

register_configs()

#: the ``full`` tier (``make test-full``): modules whose tests run the CLI in subprocesses, build hub
#: fixtures, wheels, sweeps or multirun trees, or replay reference code. ``make test`` (the fast tier)
#: is everything else: the unit tests of every module plus one end-to-end run per method and
#: protocol (``test_every_method.py::test_runs_end_to_end_in_each_protocol``). No test is left out:
#: ``.ci/run`` runs both tiers.
FULL_MODULES = {
    "test_backbones_clip",
    "test_backbones_openclip",
    "test_backbones_t5",
    "test_bad_input",
    "test_baselines_e2e",
    "test_bench",
    "test_bounded_memory",
    "test_broken_files",
    "test_checked_inputs",
    "test_console",
    "test_converter",
    "test_export",
    "test_identify_finetuned",
    "test_identity",
    "test_mingle_e2e",
    "test_otmf_authors",
    "test_ownership",
    "test_packaging",
    "test_plots",
    "test_prefetch_sweep",
    "test_provenance",
    "test_reliability",
    "test_requeue",
    "test_resume_guard",
    "test_run_dirs",
    "test_sweeps",
    "test_tables",
    "test_tables_pooling",
    "test_wandb",
    "test_zoo",
}
#: tests of the fast-tier modules that belong to the full tier all the same (CLI runs, resume of every method)
FULL_TESTS = {"test_cli_run", "test_interrupted_then_resumed_equals_uninterrupted"}
FULL_TESTS |= {
    "test_offload_is_bitwise_with_every_other_setting",
    "test_ascii_stdout_and_a_closed_pipe_keep_exit_0",
    "test_ctrl_c_in_zoo_build_is_exit_130_one_line",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if module in FULL_MODULES or item.originalname in FULL_TESTS:
            item.add_marker(pytest.mark.full)


@pytest.fixture
def make_cfg():
    """``make_cfg(*overrides)`` composes ``run.yaml`` like the command line would."""

    def _make(*overrides: str):
        with initialize_config_module(config_module="otmf_exp.conf", version_base="1.3"):
            return compose(config_name="run", overrides=["progress=false", *overrides])

    return _make


@pytest.fixture(scope="session")
def zoo():
    from otmf_exp.offline.zoo import DigitsZoo, suite_tasks

    z = DigitsZoo(progress=False)
    z.build(suite_tasks())  # the pre-trained tower + the digits8 tasks (others build on demand)
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


@pytest.fixture(scope="session")
def digits_multirun(tmp_path_factory, zoo):
    """A real multirun tree on digits8 (tables, plots, W&B tests): ``python -m otmf_exp.run -m``
    with 2 methods x 2 task orders, 4 of the 8 tasks, the validation split (small, fast), and
    W&B in offline mode so every job also leaves its own offline W&B run. Returns the sweep dir."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("multirun") / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "otmf_exp.run",
        "-m",
        "method=averaging,task_arithmetic",
        "task_order=shuffled",
        "order_seed=0,1",
        "task_seq.tasks=[rot90,flip,invert,parity]",
        "eval_split=validation",
        "progress=false",
        "logger=wandb",
        "logger.mode=offline",
        f"hydra.sweep.dir={root}",
    ]
    env = {**os.environ, "WANDB_SILENT": "true"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root
