"""FusionBench 0.2.33's ``ContinualImageClassificationFineTuningForCLIP`` on the zoo's θ₀, its ``run()``
unchanged; only data plumbing replaced (a pool serving a ``CLIPModel`` with the zoo's tower, the
batches our side recorded as its loader, the zoo's heads, no logger)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from otmf_exp.parity.reference.zoo import Zoo

ZERO_GRAD = ".k_proj.bias"


def finetune(
    vision_cfg: dict,
    pretrained: dict[str, Tensor],
    heads: dict[str, Tensor],
    spec: dict,
    b: dict[str, Tensor],
    log_dir: Path,
    lora_init: dict[str, Tensor] | None = None,
    snapshot: bool = True,
    wrap: Any = None,
) -> tuple[Any, list[dict[str, Tensor]], list[float]]:
    """FusionBench's class ``run()`` on θ₀ (``pretrained``: vision tower + ``visual_projection``) with
    the recorded batches ``b`` (``<task>/<i>/x|y``), ``heads`` (logit scale folded in) and ``spec``'s
    settings: the plumbing parity and bench-peer share. Returns the final model, the vision weights
    after every task (``snapshot``) and every step's loss; ``wrap`` wraps the function that builds the
    CLIP model it is served (bench-peer times it as loading)."""
    import fusion_bench.method.classification.continual_clip_finetune as fb
    import lightning as L
    from fusion_bench.modelpool import CLIPVisionModelPool
    from omegaconf import DictConfig
    from peft.tuners.lora import LoraLayer
    from transformers import CLIPConfig, CLIPModel

    dtype = getattr(torch, spec.get("dtype", "float32"))  # the float64 rows: both sides in float64
    tasks = spec["tasks"]
    text_cfg = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config=text_cfg, vision_config=vision_cfg, projection_dim=vision_cfg["projection_dim"]
    )

    def clip_model() -> CLIPModel:
        model = CLIPModel(config).to(dtype)
        res = model.load_state_dict(pretrained, strict=False)
        assert not res.unexpected_keys, res.unexpected_keys
        model.logit_scale.data.fill_(0.0)  # exp = 1: the zoo's heads carry the logit scale
        return model.eval()

    build = wrap(clip_model) if wrap else clip_model

    class Pool(CLIPVisionModelPool):
        def __init__(self) -> None:  # data plumbing only: no hub, no config
            pass

        train_dataset_names = property(lambda self: list(tasks))

        def load_clip_model(self, name: str, *a: Any, **k: Any) -> CLIPModel:
            return build()

        def load_processor(self, *a: Any, **k: Any) -> Any:
            return lambda image: image

        def load_train_dataset(self, name: str, *a: Any, **k: Any) -> list:
            return [name]  # a token: the loader below serves the recorded batches

    order = iter(tasks)

    def recorded_loader(dataset: Any, shuffle: bool, batch_size: int, num_workers: int) -> Any:
        t = next(order)
        batches = [(b[f"{t}/{i}/x"], b[f"{t}/{i}/y"]) for i in range(spec["steps"])]
        return torch.utils.data.DataLoader(batches, batch_size=None)

    fb.DataLoader = recorded_loader
    lora_cfg = DictConfig({"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0,
                           "bias": "none"})  # fmt: skip
    algo = fb.ContinualImageClassificationFineTuningForCLIP(
        seed=42, shuffle_order=False, learning_rate=spec["lr"], weight_decay=0, num_steps=spec["steps"],
        batch_size=spec["batch_size"], num_workers=0, save_interval=10**9, use_lora=spec["lora"], lora_config=lora_cfg,
    )  # fmt: skip
    from lightning.fabric.loggers import CSVLogger

    class Logger(CSVLogger):  # FusionBench logs its hyperparameters; CSVLogger cannot
        def log_hyperparams(self, params: Any, *a: Any, **k: Any) -> None:
            pass

    fabric = L.Fabric(accelerator="cpu", devices=1, loggers=[Logger(str(log_dir))])
    fabric.launch()
    algo.fabric = fabric
    algo._program = SimpleNamespace(taskpool=None)
    algo.setup_zero_shot_classification_head = lambda **kw: setattr(
        algo, "zeroshot_weights", {t: heads[t].to(dtype) for t in tasks}
    )
    losses: list[float] = []
    fabric.log_dict = lambda metrics, step=None: losses.append(float(metrics["train/loss"]))
    snapshots: list[dict] = []

    def vision_weights(vm: Any) -> dict[str, Tensor]:
        """The vision tower's weights under our names (LoRA deltas merged in, the model untouched)."""
        out = {}
        for name, p in vm.named_parameters():
            if "lora_" not in name:
                out["vision_model." + name.replace("base_model.model.", "").replace(".base_layer", "")] = (
                    p.detach().clone()
                )
        for name, mod in vm.named_modules():
            if isinstance(mod, LoraLayer):
                k = "vision_model." + name.replace("base_model.model.", "") + ".weight"
                out[k] = out[k] + mod.get_delta_weight("default")
        return out

    setup_model = algo.setup_model

    def setup_model_with_our_adapters():
        processor, classifier, optimizer, sched = setup_model()
        vm = classifier.clip_model.vision_model
        if spec["lora"]:
            with torch.no_grad():
                for name, p in vm.named_parameters():
                    if "lora_" in name:
                        p.copy_(lora_init["lora/vision_model." + name.replace("base_model.model.", "")])
        reset = optimizer.load_state_dict

        def snapshot_then_reset(sd: Any) -> Any:  # called before each task: the weights after the previous
            snapshots.append(vision_weights(vm))
            return reset(sd)

        if snapshot:
            optimizer.load_state_dict = snapshot_then_reset
        return processor, classifier, optimizer, sched

    algo.setup_model = setup_model_with_our_adapters
    final = algo.run(Pool())
    if snapshot:
        snapshots.append(vision_weights(final))
    return final, snapshots, losses


def _run(zoo_dir: Path, work_dir: Path, key: str) -> dict[str, Tensor]:
    zoo = Zoo(zoo_dir)
    spec = json.loads((work_dir / f"{key}.spec.json").read_text())
    b = load_file(str(work_dir / f"{key}.batches.safetensors"))
    lora_init = load_file(str(work_dir / f"{key}.lora_init.safetensors")) if spec["lora"] else None
    log_dir = work_dir / f"{key}.fb_logs"
    _, snapshots, losses = finetune(
        zoo.config["module_config"], zoo.pretrained, zoo.heads, spec, b, log_dir, lora_init
    )
    out = {
        f"weights/task{i}/{k}": v
        for i, s in enumerate(snapshots[1:])
        for k, v in s.items()
        if not k.endswith(ZERO_GRAD)
    }
    out["loss"] = torch.tensor(losses, dtype=torch.float64)
    return out


def full(zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
    return _run(zoo_dir, work_dir, "cft_full")


def lora(zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
    return _run(zoo_dir, work_dir, "cft_lora")
