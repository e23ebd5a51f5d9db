"""FusionBench 0.2.33's data-free mergers on the zoo: averaging, Task Arithmetic, TIES, MagMax, TSV-M, Consensus TA.

Each function returns the reference's merged ``vision_model.*`` weights. The reference side only
loads models and hands them to FusionBench's own classes / functions; the arithmetic is theirs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from otmf_exp.parity.reference.zoo import PRETRAINED, Zoo, state_of

POS = "vision_model.embeddings.position_embedding.weight"


def _pool(zoo: Zoo):
    from fusion_bench.modelpool import BaseModelPool

    return BaseModelPool(models=zoo.towers())


def _averaging(zoo: Zoo) -> dict[str, torch.Tensor]:
    from fusion_bench.method import SimpleAverageAlgorithm

    return state_of(SimpleAverageAlgorithm().run(_pool(zoo)))


def averaging(zoo_dir: Path, work_dir: Path) -> dict[str, torch.Tensor]:
    return _averaging(Zoo(zoo_dir))


def averaging_f64(zoo_dir: Path, work_dir: Path) -> dict[str, torch.Tensor]:
    return _averaging(Zoo(zoo_dir, torch.float64))


def _task_arithmetic(zoo: Zoo) -> dict[str, torch.Tensor]:
    from fusion_bench.method import TaskArithmeticAlgorithm

    return state_of(TaskArithmeticAlgorithm(scaling_factor=0.3).run(_pool(zoo)))


def task_arithmetic(zoo_dir: Path, work_dir: Path) -> dict[str, torch.Tensor]:
    return _task_arithmetic(Zoo(zoo_dir))


def task_arithmetic_f64(zoo_dir: Path, work_dir: Path) -> dict[str, torch.Tensor]:
    return _task_arithmetic(Zoo(zoo_dir, torch.float64))


def _ties(zoo: Zoo) -> dict[str, torch.Tensor]:
    from fusion_bench.method import TiesMergingAlgorithm

    algo = TiesMergingAlgorithm(scaling_factor=0.3, threshold=20, remove_keys=[], merge_func="sum")
    return state_of(algo.run(_pool(zoo)))


def ties(zoo_dir: Path, work_dir: Path) -> dict[str, torch.Tensor]:
    return _ties(Zoo(zoo_dir))


def ties_f64(zoo_dir: Path, work_dir: Path) -> dict[str, torch.Tensor]:
    return _ties(Zoo(zoo_dir, torch.float64))


def magmax(zoo_dir: Path, work_dir: Path) -> dict[str, torch.Tensor]:
    from fusion_bench.method.magmax.magmax import MagMaxAlgorithm

    return state_of(MagMaxAlgorithm(scaling_factor=0.5).run(_pool(Zoo(zoo_dir))))


def _tsvm(zoo: Zoo, **kw) -> dict[str, torch.Tensor]:
    from fusion_bench.method import TaskSingularVectorMerging

    return state_of(TaskSingularVectorMerging(**kw).run(_pool(zoo)))


def tsvm(zoo_dir: Path, work_dir: Path) -> dict[str, torch.Tensor]:
    return _tsvm(Zoo(zoo_dir), alpha=1)


def tsvm_alpha05_exclude_pos(zoo_dir: Path, work_dir: Path) -> dict[str, torch.Tensor]:
    return _tsvm(Zoo(zoo_dir), alpha=0.5, exclude_keys=[POS])


def _consensus(zoo: Zoo, bug: bool, lam: float = 0.6, k: int = 2, scaling: float = 0.3):
    """FusionBench ``tall_mask/utils.py``'s Consensus TA on the flattened models (its mask loader,
    which reads files the pipeline never writes loadably, replaced by the masks just made)."""
    from fusion_bench.method.tall_mask import task_arithmetic as tall_ta
    from fusion_bench.method.tall_mask import utils as tall
    from fusion_bench.method.ties_merging.ties_merging_utils import state_dict_to_vector, vector_to_state_dict
    from fusion_bench.utils.state_dict_arithmetic import state_dict_sub, state_dict_sum

    towers = zoo.towers()
    ptm = state_of(towers.pop(PRETRAINED))
    fts = [state_of(m) for m in towers.values()]
    flat_ft = torch.vstack([state_dict_to_vector(sd) for sd in fts])
    flat_ptm = state_dict_to_vector(ptm)
    tv_flat = flat_ft - flat_ptm
    merged_tv = tv_flat.sum(dim=0)
    if bug:  # TALL-mask compression's own mask, on state dicts
        tvs = [state_dict_sub(sd, ptm) for sd in fts]
        multi = state_dict_sum(tvs)
        masks = [tall_ta.generate_task_masks(multi, tv, ptm, tall_mask_lambda=lam) for tv in tvs]
        masks = [{n: v.bool() for n, v in mk.items()} for mk in masks]
    else:
        flat_masks = tall.generate_task_masks(tv_flat, flat_ft, flat_ptm, tv=merged_tv, tall_mask_lambda=lam)
        masks = [vector_to_state_dict(mk, ptm) for mk in flat_masks]
    loaded = {f"task{i}": mk for i, mk in enumerate(masks)}
    real = tall.load_tall_mask
    tall.load_tall_mask = lambda remove_keys, ptm_check, config: loaded  # data plumbing: no mask files
    try:
        consensus = tall.construct_consensus_mask(ptm, k, None, [])
    finally:
        tall.load_tall_mask = real
    masked = vector_to_state_dict(merged_tv * consensus, ptm)
    return {n: ptm[n] + scaling * masked[n] for n in ptm}  # TaskVector.apply_to: θ₀ + coef·τ


def consensus(zoo_dir: Path, work_dir: Path) -> dict[str, torch.Tensor]:
    return _consensus(Zoo(zoo_dir), bug=False)


def consensus_bug(zoo_dir: Path, work_dir: Path) -> dict[str, torch.Tensor]:
    return _consensus(Zoo(zoo_dir), bug=True)
