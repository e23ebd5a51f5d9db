"""FusionBench 0.2.33's ``OPCMForCLIP`` on the zoo: the merged tower after every continual step."""

from __future__ import annotations

import types
from pathlib import Path

import torch

from otmf_exp.parity.reference.zoo import Zoo, state_of, steps


def _opcm(zoo: Zoo, alpha: float = 0.5) -> dict[str, torch.Tensor]:
    from fusion_bench.method.opcm.opcm import OPCMForCLIP
    from fusion_bench.modelpool import BaseModelPool

    captured: list[dict[str, torch.Tensor]] = []

    class Algo(OPCMForCLIP):
        log_dir = None  # no loggers, nothing written

        def save_merged_model(self, merged_model, step):  # its per-step hook: capture the model
            captured.append(state_of(merged_model))

    algo = Algo(alpha=alpha, shuffle_order=False, seed=None, save_on_every_step=True)
    algo._program = types.SimpleNamespace(taskpool=types.SimpleNamespace(_test_datasets={}))
    algo.run(BaseModelPool(models=zoo.towers()))
    return steps(captured)


def opcm(zoo_dir: Path, work_dir: Path) -> dict[str, torch.Tensor]:
    return _opcm(Zoo(zoo_dir))


def opcm_f64(zoo_dir: Path, work_dir: Path) -> dict[str, torch.Tensor]:
    return _opcm(Zoo(zoo_dir, torch.float64))
