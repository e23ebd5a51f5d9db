"""FusionBench 0.2.33's Concrete subspace algorithms (task arithmetic, task-wise AdaMerging) on the zoo,
``run()`` unchanged: a ``CLIPVisionModelPool`` of the zoo's towers, the batches our side recorded,
the zoo's heads, its global RNG seeded with our mask seed after the model setup."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor

from otmf_exp.parity.reference.adamerging import heads_setup, served, weights
from otmf_exp.parity.reference.zoo import Zoo

TASKS = ["rot90", "flip", "invert"]
MASK_STEPS, ADAMERGING_STEPS, BATCH = 20, 20, 16
YAMLS = {
    "task_arithmetic": ("clip_concrete_task_arithmetic", "ConcreteTaskArithmeticAlgorithmForCLIP"),
    "adamerging": ("clip_concrete_task_wise_adamerging", "ConcreteTaskWiseAdaMergingForCLIP"),
}


def algorithm(
    merge: str,
    heads: Any,
    tasks: list[str],
    streams: dict[str, Any],
    seed: int,
    dtype: torch.dtype = torch.float32,
) -> tuple[Any, dict[str, Any]]:
    """FusionBench's Concrete class for ``merge`` with the rows' settings (its yaml, our step counts and
    batch size), fed ``streams`` and ``heads`` (a :class:`Zoo` or bench-peer's synthetic heads), its
    global RNG seeded with ``seed`` right after its model setup: the plumbing parity and bench-peer
    share. Returns the algorithm and the dict its mask model, mask and merged module land in."""
    import lightning as L

    yaml_name, cls_name = YAMLS[merge]
    cfg_dir = Path(importlib.import_module("fusion_bench_config").__path__[0])
    cfg = OmegaConf.load(cfg_dir / "method" / "concrete_subspace" / f"{yaml_name}.yaml")
    cfg.max_steps, cfg.batch_size, cfg.save_interval = MASK_STEPS, BATCH, 10**9
    if "max_adamerging_steps" in cfg:
        cfg.max_adamerging_steps = ADAMERGING_STEPS
    mod = "clip_concrete_task_arithmetic" if merge == "task_arithmetic" else "clip_concrete_adamerging"
    cls = getattr(importlib.import_module(f"fusion_bench.method.concrete_subspace.{mod}"), cls_name)
    algo = cls(cfg)
    algo.fabric = L.Fabric(accelerator="cpu", devices=1)
    algo.log_hyperparams = lambda *a, **k: None
    algo.get_shuffled_test_loader_iter = lambda task: streams[task]
    algo.setup_zero_shot_classification_head = heads_setup(algo, heads, tasks, dtype)
    seen: dict[str, Any] = {}
    setup_models = algo.setup_models

    def seeded_setup() -> Any:
        out = setup_models()
        seen["mask_model"] = out[1]
        unload = out[0].merge_and_unload

        def kept(*a: Any, **k: Any) -> Any:  # the merged weights before task arithmetic's .to(float32)
            model = unload(*a, **k)
            seen["weights"] = weights(model)
            return model

        out[0].merge_and_unload = kept
        sample = out[1].sample_mask

        def keep(*a: Any, **k: Any) -> Any:
            seen["mask"] = sample(*a, **k)  # the dict run() rescales in place
            return seen["mask"]

        out[1].sample_mask = keep
        torch.manual_seed(seed)
        seen["module"] = out[0]
        return out

    algo.setup_models = seeded_setup
    return algo, seen


def _run(zoo_dir: Path, work_dir: Path, merge: str, key: str, dtype: torch.dtype) -> dict[str, Tensor]:
    from fusion_bench.modelpool import CLIPVisionModelPool

    zoo = Zoo(zoo_dir, dtype)
    paths = {}
    for name in ["_pretrained_", *TASKS]:
        paths[name] = str(work_dir / f"{key}.models" / name)
        zoo.tower("pretrained" if name == "_pretrained_" else name, dtype=dtype).save_pretrained(paths[name])
    target = "transformers.CLIPVisionModel.from_pretrained"
    extra = {"torch_dtype": "auto"} if dtype == torch.float64 else {}  # the checkpoint's float64
    pool = CLIPVisionModelPool(
        models={
            k: {"_target_": target, "pretrained_model_name_or_path": v, **extra} for k, v in paths.items()
        }
    )
    seed = json.loads((work_dir / f"{key}.spec.json").read_text())["mask_seed"]
    mod = "clip_concrete_task_arithmetic" if merge == "task_arithmetic" else "clip_concrete_adamerging"
    module = importlib.import_module(f"fusion_bench.method.concrete_subspace.{mod}")
    saved = module.get_task_wise_weights
    if dtype == torch.float64:  # Λ in float64 while the row runs (FusionBench creates it float32)
        module.get_task_wise_weights = _full64
    try:
        algo, seen = algorithm(merge, zoo, TASKS, served(work_dir, key, TASKS, dtype), seed, dtype)
        model = algo.run(pool)
    finally:  # the runner's later rows get FusionBench's own
        module.get_task_wise_weights = saved
    final = weights(model)
    if dtype == torch.float32:
        assert all(torch.equal(final[k], v) for k, v in seen["weights"].items())
    out = {f"weights/{k}": v for k, v in seen["weights"].items()}
    out.update({f"logits/{k}": v.detach() for k, v in seen["mask_model"].named_parameters()})
    out.update({f"mask/{k}": v.detach() for k, v in seen["mask"].items()})
    if merge == "adamerging":
        out["coef"] = seen["module"].merge_weight.detach().reshape(-1)
    return out


def _full64(num_models: int, init_values: float | None = None) -> Tensor:
    """FusionBench's ``get_task_wise_weights`` in float64."""
    value = 1.0 / num_models if init_values is None else init_values
    return torch.full((num_models,), value, dtype=torch.float64)


def task_arithmetic(zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
    return _run(zoo_dir, work_dir, "task_arithmetic", "concrete_ta", torch.float32)


def adamerging(zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
    return _run(zoo_dir, work_dir, "adamerging", "concrete_adamerging", torch.float32)


def task_arithmetic64(zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
    return _run(zoo_dir, work_dir, "task_arithmetic", "concrete_ta64", torch.float64)


def adamerging64(zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
    return _run(zoo_dir, work_dir, "adamerging", "concrete_adamerging64", torch.float64)
