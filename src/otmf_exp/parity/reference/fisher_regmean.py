"""FusionBench 0.2.33's Fisher merging and RegMean for CLIP on the zoo, fed our side's batches.

Plumbing only: Lightning Fabric is an identity stand-in (one CPU process), the CLIP processor is
the identity (the batches are tensors already), the zero-shot heads are ours with the logit scale
folded in (``logit_scale_exp = 1``), and RegMean's shuffled loader is told not to reshuffle (it
gets the batches in the order our method drew them).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from otmf_exp.parity.reference.zoo import Zoo


class _Fabric:
    """Identity stand-in for Lightning Fabric (one CPU process: nothing to wrap)."""

    _loggers = None

    def setup_dataloaders(self, loader):
        return loader

    def setup(self, model):
        return model


def _dataset(work_dir: Path, task: str, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, int]]:
    """Our batches of ``task`` as a list of (image, label) examples, in order."""
    saved = load_file(str(work_dir / "batches.safetensors"))
    n = len({k.split("/")[1] for k in saved if k.startswith(f"{task}/")})
    out = []
    for i in range(n):
        x, y = saved[f"{task}/{i}/inputs"].to(dtype), saved[f"{task}/{i}/labels"]
        out += [(x[j], int(y[j])) for j in range(len(y))]
    return out


def _setup(alg, zoo: Zoo) -> None:
    alg._fabric_instance = _Fabric()
    alg._clip_processor = lambda x: x
    alg.visual_projection = zoo.projection()
    alg.logit_scale_exp = torch.tensor(1.0, dtype=zoo.dtype)
    alg.zeroshot_weights = {t: h.to(zoo.dtype) for t, h in zoo.heads.items()}


def _loader_kwargs():
    from omegaconf import DictConfig

    return DictConfig({"batch_size": 32, "num_workers": 0})


def fisher_algorithm():
    """FusionBench's Fisher merging for CLIP with the settings of the parity row (and bench-peer's)."""
    from fusion_bench.method.fisher_merging.clip_fisher_merging import FisherMergingForCLIPVisionModel

    return FisherMergingForCLIPVisionModel(
        exclude_param_names_regex=[],
        normalize_fisher_weight=True,
        minimal_fisher_weight=1e-6,
        num_fisher_examples=256,
        dataloader_kwargs=_loader_kwargs(),
    )


def regmean_algorithm():
    """FusionBench's RegMean for CLIP with the settings of the parity row (and bench-peer's)."""
    from fusion_bench.method.regmean.clip_regmean import RegMeanAlgorithmForCLIP

    return RegMeanAlgorithmForCLIP(
        num_regmean_examples=256,
        exclude_param_names_regex=[],
        reduce_non_diagonal_ratio=0.95,
        weight_transpose=True,
        dataloader_kwargs=_loader_kwargs(),
    )


def fisher(zoo_dir: Path, work_dir: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    from fusion_bench.method.fisher_merging.fisher_merging import merging_with_fisher_weights

    zoo = Zoo(zoo_dir, dtype)
    alg = fisher_algorithm()
    _setup(alg, zoo)
    params: dict[str, list[torch.Tensor]] = {}
    fishers = []
    for t in zoo.tasks:
        model = zoo.tower(t)
        for k, v in model.state_dict().items():
            params.setdefault(k, []).append(v.detach().clone())
        names = list(model.state_dict())
        fishers.append(alg.get_fisher_weights(t, model, _dataset(work_dir, t, dtype), names))
    weights = torch.ones(len(zoo.tasks), dtype=dtype) / len(zoo.tasks)  # run()'s, in the default dtype
    return merging_with_fisher_weights(params, fishers, weights, True, 1e-6)


def regmean(zoo_dir: Path, work_dir: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    import fusion_bench.method.regmean.clip_regmean as clip_regmean
    from fusion_bench.method.regmean.regmean import merging_with_regmean_weights
    from fusion_bench.method.regmean.utils import get_modules_to_merge

    zoo = Zoo(zoo_dir, dtype)
    alg = regmean_algorithm()
    _setup(alg, zoo)
    real_loader = clip_regmean.DataLoader
    clip_regmean.DataLoader = lambda ds, shuffle, **kw: real_loader(ds, shuffle=False, **kw)  # our order
    params: dict[str, list[torch.Tensor]] = {}
    grams = []
    try:
        for t in zoo.tasks:
            model = zoo.tower(t)
            for k, v in model.state_dict().items():
                params.setdefault(k, []).append(v.detach().clone())
            linear = get_modules_to_merge(model, [torch.nn.Linear])
            grams.append(alg.get_regmean_weights(t, model, _dataset(work_dir, t, dtype), linear))
    finally:
        clip_regmean.DataLoader = real_loader
    return merging_with_regmean_weights(params, grams, 0.95, True)


def fisher64(zoo_dir: Path, work_dir: Path) -> dict[str, torch.Tensor]:
    return fisher(zoo_dir, work_dir, torch.float64)


def regmean64(zoo_dir: Path, work_dir: Path) -> dict[str, torch.Tensor]:
    # reduce_non_diagonal_elements builds its factors with torch.ones (the default dtype): float64 too
    torch.set_default_dtype(torch.float64)
    try:
        return regmean(zoo_dir, work_dir, torch.float64)
    finally:
        torch.set_default_dtype(torch.float32)
