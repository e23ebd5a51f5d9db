"""FusionBench 0.2.33's ``CLIPWeightEnsemblingMoEAlgorithm`` on the zoo: routers seeded with our
seeds, the batches our side recorded, the zoo's heads; returns the routers and the adapted logits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from otmf_exp.parity.reference.adamerging import fabric, heads_setup, pool, served
from otmf_exp.parity.reference.zoo import Zoo

TASKS = ["rot90", "flip", "invert"]
#: FusionBench gate parameter -> our router key
ROUTER_MAP = {"fc1.weight": "w1", "fc1.bias": "b1", "fc2.weight": "w", "fc2.bias": "b", "fc.weight": "w",
              "fc.bias": "b", "weight": "w"}  # fmt: skip


def _routers(moe: Any, blocks: list[str]) -> dict[str, Tensor]:
    out = {}
    for name, layer in zip(blocks, moe.vision_model.encoder.layers):
        for k, p in layer.mlp.gate.named_parameters():
            out[f"{name}/router.{ROUTER_MAP[k]}"] = p.detach().clone()
    return out


def joint(zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
    return _joint(zoo_dir, work_dir, torch.float32)


def joint_f64(zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
    torch.set_default_dtype(torch.float64)  # the gates are nn.Linear / Parameters of the default dtype
    try:
        return _joint(zoo_dir, work_dir, torch.float64)
    finally:
        torch.set_default_dtype(torch.float32)


def _joint(zoo_dir: Path, work_dir: Path, dtype: torch.dtype) -> dict[str, Tensor]:
    import fusion_bench.method.we_moe.clip_we_moe as cw
    import fusion_bench.models.we_moe as wm
    from omegaconf import DictConfig

    zoo = Zoo(zoo_dir, dtype)
    spec = json.loads((work_dir / "wemoe.spec.json").read_text())
    seeds = iter(spec["router_seeds"])
    init = wm.Depth_2_Gate.init_weight

    def seeded(self: Any, init_lambda: float) -> None:
        """FusionBench's own init (N(0, 0.01²) weights, biases 0 / init_lambda), the global RNG set before
        each draw to our generator's state for it: the hidden layer = the first draw of our block's
        ``hidden`` seed, the last layer = the second draw of its ``joint`` seed (after a hidden-size²
        draw that our joint router discards)."""
        hidden_seed, joint_seed = next(seeds)
        plan = iter([(hidden_seed, 0), (joint_seed, self.fc1.weight.numel())])
        real = torch.nn.init.normal_

        def normal_(t: Tensor, *a: Any, **k: Any) -> Tensor:
            seed, burn = next(plan)
            torch.manual_seed(seed)
            if burn:
                torch.randn(burn)
            return real(t, *a, **k)

        torch.nn.init.normal_ = normal_
        try:
            init(self, init_lambda)
        finally:
            torch.nn.init.normal_ = real

    wm.Depth_2_Gate.init_weight = seeded

    def task_arithmetic_merge(pretrained: Any, finetuned: list, scaling_factor: float) -> Any:
        """θ₀ + λ·Σ τ_i in place (0.2.33's own refuses Parameter + Tensor)."""
        sds = [m.state_dict() for m in finetuned]
        with torch.no_grad():
            for k, p in pretrained.state_dict().items():
                p.copy_(p + scaling_factor * sum(sd[k] - p for sd in sds))
        return pretrained

    cw.task_arithmetic_merge = task_arithmetic_merge
    cfg = DictConfig({"name": "clip_weight_ensembling_moe", "checkpoint": False, "save_checkpoint": False,
                      "router_hidden_layers": 2, "init_lambda": 0.3, "batch_reduce": True, "lr": 1e-4,
                      "optimizer": "adam", "devices": 1, "batch_size": spec["batch_size"], "num_workers": 0,
                      "max_steps": spec["steps"], "use_grad_accumulate": True, "cache_dir": "outputs",
                      "fast_dev_run": False})  # fmt: skip
    algo = cw.CLIPWeightEnsemblingMoEAlgorithm(cfg)
    algo._fabric = fabric()
    algo.setup_zero_shot_classification_head = heads_setup(algo, zoo, TASKS, dtype)
    streams = served(work_dir, "wemoe", TASKS, dtype)
    algo.get_shuffled_test_loader_iter = lambda task: streams[task]
    out: dict[str, Tensor] = {}
    tta = algo.test_time_adaptation

    def keep_init(module: Any) -> Any:
        out.update({f"init/{k}": v for k, v in _routers(module, spec["blocks"]).items()})
        return tta(module)

    algo.test_time_adaptation = keep_init
    try:
        moe = algo.run(pool(zoo, TASKS, dtype))
    finally:  # the other cases of this process get FusionBench's own init
        wm.Depth_2_Gate.init_weight = init
    out["batch_reduce"] = torch.tensor(
        [float(layer.mlp.batch_reduce) for layer in moe.vision_model.encoder.layers]
    )
    out.update({f"router/{k}": v for k, v in _routers(moe, spec["blocks"]).items()})
    ev = load_file(str(work_dir / "wemoe.eval.safetensors"))
    with torch.no_grad():
        for t in TASKS:
            out[f"logits/{t}"] = algo.compute_logits(moe, (ev[f"{t}/x"].to(dtype), None), t)
    return out


def _task_arithmetic_merge(pretrained: Any, finetuned: list, scaling_factor: float) -> Any:
    """θ₀ + λ·Σ τ_i in place (0.2.33's own refuses Parameter + Tensor)."""
    sds = [m.state_dict() for m in finetuned]
    with torch.no_grad():
        for k, p in pretrained.state_dict().items():
            p.copy_(p + scaling_factor * sum(sd[k] - p for sd in sds))
    return pretrained


def _routing(zoo_dir: Path, work_dir: Path, dtype: torch.dtype) -> dict[str, Tensor]:
    """FusionBench's ``construct_moe_model`` per router depth, our redrawn routers loaded into its gates, the
    batch / per-sample routing set on every MoE layer; the logits of the eval images through it."""
    import fusion_bench.method.we_moe.clip_we_moe as cw
    from omegaconf import DictConfig

    torch.set_default_dtype(dtype)  # the gates are nn.Linear / Parameters of the default dtype
    try:
        zoo = Zoo(zoo_dir, dtype)
        routers = load_file(str(work_dir / "wemoe_routing.safetensors"))
        ev = load_file(str(work_dir / "wemoe.eval.safetensors"))
        cw.task_arithmetic_merge = _task_arithmetic_merge
        out: dict[str, Tensor] = {}
        for depth in (0, 1, 2):
            cfg = DictConfig({"router_hidden_layers": depth, "init_lambda": 0.3, "batch_reduce": True})
            algo = cw.CLIPWeightEnsemblingMoEAlgorithm(cfg)
            algo.modelpool = pool(zoo, TASKS, dtype)
            heads_setup(algo, zoo, TASKS, dtype)()
            moe = algo.construct_moe_model()
            blocks = [
                f"vision_model.encoder.layers.{i}.mlp" for i in range(len(moe.vision_model.encoder.layers))
            ]
            for name, layer in zip(blocks, moe.vision_model.encoder.layers, strict=True):
                for k, p in layer.mlp.gate.named_parameters():
                    p.data = routers[f"router/d{depth}/{name}/router.{ROUTER_MAP[k]}"].to(dtype).clone()
            out.update({f"router/d{depth}/{k}": v for k, v in _routers(moe, blocks).items()})
            for br in (True, False):
                for layer in moe.vision_model.encoder.layers:
                    layer.mlp.batch_reduce = br
                with torch.no_grad():
                    for t in TASKS:
                        out[f"logits/d{depth}_br{int(br)}/{t}"] = algo.compute_logits(
                            moe, (ev[f"{t}/x"].to(dtype), None), t
                        )
        return out
    finally:
        torch.set_default_dtype(torch.float32)


def routing(zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
    return _routing(zoo_dir, work_dir, torch.float32)


def routing_f64(zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
    return _routing(zoo_dir, work_dir, torch.float64)
