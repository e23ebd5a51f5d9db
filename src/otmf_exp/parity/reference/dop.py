"""FusionBench 0.2.33's ``ContinualDOPForCLIP`` on the zoo (``dop.yaml`` defaults, given order)."""

from __future__ import annotations

from pathlib import Path

import torch

from otmf_exp.parity.reference.zoo import Zoo, state_of, steps

TASKS = ["rot90", "flip", "invert"]  # three steps: two DOP merges (step 1 is θ_1 itself)


def _dop(zoo: Zoo, tasks: list[str], num_steps: int = 200) -> dict[str, torch.Tensor]:
    import fusion_bench_config
    from fusion_bench.method.dop.dop import ContinualDOPForCLIP
    from fusion_bench.modelpool import BaseModelPool
    from omegaconf import OmegaConf

    yaml = OmegaConf.load(Path(fusion_bench_config.__path__[0]) / "method" / "dop" / "dop.yaml")
    kwargs = {k: v for k, v in OmegaConf.to_container(yaml).items() if k != "_target_"}
    kwargs |= {"seed": 0, "shuffle_order": False, "evaluate_on_every_step": False, "num_steps": num_steps}
    kwargs["save_on_every_step"] = True
    captured: list[dict[str, torch.Tensor]] = []
    algo = ContinualDOPForCLIP(**kwargs)
    algo.save_merged_model = lambda model, step: captured.append(state_of(model))
    algo.run(BaseModelPool(models=zoo.towers(tasks)))
    return steps(captured)


def dop(zoo_dir: Path, work_dir: Path) -> dict[str, torch.Tensor]:
    return _dop(Zoo(zoo_dir), TASKS)


def dop_f64(zoo_dir: Path, work_dir: Path) -> dict[str, torch.Tensor]:
    return _dop(Zoo(zoo_dir, torch.float64), TASKS)
