"""Parity rows of Fisher merging and RegMean (joint, data-driven through the same batches).

Our side runs the method on the zoo with the digits data and saves, per task, the batches the
method draws (its own seeded stream) to ``WORK/batches.safetensors``; the reference side feeds
exactly those batches to FusionBench's ``get_fisher_weights`` / ``get_regmean_weights`` and merges
with its ``merging_with_fisher_weights`` / ``merging_with_regmean_weights``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from otmf_exp.parity.core import F64_WHY, Case
from otmf_exp.parity.ours import backbone, build, run, zoo_tasks
from otmf_exp.parity.reference.zoo import save

REF = "otmf_exp.parity.reference.fisher_regmean"


def save_batches(zoo_dir: Path, work_dir: Path, name: str) -> None:
    """The batches method ``name`` (defaults, seed 0) draws per task, as ``<task>/<i>/inputs|labels``."""
    from otmf_exp.data.base import example_batches
    from otmf_exp.data.digits import build_task

    method = build(name, backbone(zoo_dir), "joint")
    cfg, out = method.cfg, {}
    for t in zoo_tasks(zoo_dir):
        seed = method.ctx.seed_for(name, t)
        batches = example_batches(
            build_task(t), cfg.split, cfg.num_examples, cfg.batch_size, shuffle=cfg.shuffle, seed=seed
        )
        for i, b in enumerate(batches):
            out[f"{t}/{i}/inputs"], out[f"{t}/{i}/labels"] = b["inputs"], b["labels"]
    save(out, work_dir / "batches.safetensors")


def _ours(name: str, dtype: str = "float32"):
    def ours(zoo_dir: Path, work_dir: Path) -> dict[str, torch.Tensor]:
        save_batches(zoo_dir, work_dir, name)
        return run(zoo_dir, name, "joint", with_data=True, dtype=dtype)[0]

    return ours


def _case(name: str, settings: str, reference: str, bound: float, why: str, dtype: str = "float32") -> Case:
    f64 = dtype == "float64"
    return Case(f"{name}_f64" if f64 else name, name, settings + ", float64" * f64, reference, "merged weights",
                bound, why, _ours(name, dtype), f"{REF}:{name}" + "64" * f64, dtype)  # fmt: skip


CASES: list[Case] = [
    _case(
        "fisher",
        "joint, 256 examples, batch 32, normalize, ε=1e-6",
        "fusion_bench.method.fisher_merging (get_fisher_weights, merging_with_fisher_weights)",
        1e-6,
        "float32 gradients summed in another order (measured 3.6e-7); the float64 row agrees to 6.7e-16",
    ),
    _case(
        "regmean",
        "joint, 256 examples, batch 32, α=0.95",
        "fusion_bench.method.regmean (get_regmean_weights, merging_with_regmean_weights)",
        5e-8,
        "float32 Gram sums and the linear solve (cond ≤ 1.2e3) rounded in another order (measured 1.5e-8); the "
        "float64 row agrees to 1.4e-17",
    ),
    _case(
        "fisher",
        "joint, 256 examples, batch 32, normalize, ε=1e-6",
        "fusion_bench.method.fisher_merging (get_fisher_weights, merging_with_fisher_weights)",
        1e-10,
        F64_WHY + " (our Fisher accumulates in the model's float64)",
        "float64",
    ),
    _case(
        "regmean",
        "joint, 256 examples, batch 32, α=0.95",
        "fusion_bench.method.regmean (get_regmean_weights, merging_with_regmean_weights)",
        1e-10,
        F64_WHY + " (our Gram matrices accumulate in the model's float64; FusionBench's off-diagonal factor "
        "torch.ones(n) − α is built in the default dtype, set to float64: in float32 it leaves 1.3e-8)",
        "float64",
    ),
]
