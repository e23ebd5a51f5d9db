"""FusionBench 0.2.33's ``OPCMForCLIP`` on the zoo: the merged tower after every continual step."""

from __future__ import annotations

from pathlib import Path

import torch

from otmf_exp.parity.reference.zoo import Zoo, continual_steps


def _opcm(zoo: Zoo, alpha: float = 0.5) -> dict[str, torch.Tensor]:
    from fusion_bench.method.opcm.opcm import OPCMForCLIP

    return continual_steps(OPCMForCLIP, zoo, alpha=alpha)


def opcm(zoo_dir: Path, work_dir: Path) -> dict[str, torch.Tensor]:
    return _opcm(Zoo(zoo_dir))


def opcm_f64(zoo_dir: Path, work_dir: Path) -> dict[str, torch.Tensor]:
    return _opcm(Zoo(zoo_dir, torch.float64))
