"""Our side of parity: the exported zoo as this project's backbone, a method run on it step by step.

Every row's ``ours`` goes through :func:`run`: the zoo's ``CLIPVisionModelWithProjection`` becomes a
:class:`~otmf_exp.models.clip_vision.ClipVisionBackbone` (the class real CLIP runs use), the
method is built from its ``Config`` like the runner builds it, and the merged weights θ₀ + τᵐ are
taken after every step (joint: once).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from otmf_exp.merging.task_vectors import StateDict
from otmf_exp.models.clip_vision import ClipVisionBackbone
from otmf_exp.parity.reference.zoo import steps

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class ZooBackbone(ClipVisionBackbone):
    """The exported zoo's tower; task weights are handed to the method directly, never loaded by name."""

    def load_finetuned(self, task: str) -> StateDict:
        raise NotImplementedError("parity passes the zoo's task weights to the method")


def zoo_tasks(zoo_dir: Path) -> list[str]:
    return list(json.loads((Path(zoo_dir) / "config.json").read_text())["tasks"])


def backbone(zoo_dir: Path, dtype: str = "float32") -> ZooBackbone:
    """The zoo's pre-trained tower (``CLIPVisionModelWithProjection``) as our backbone, in ``dtype``."""
    from transformers import CLIPVisionModelWithProjection

    from otmf_exp.parity.reference.zoo import Zoo

    module = CLIPVisionModelWithProjection(Zoo(zoo_dir).vision_config())
    module.load_state_dict(load_file(str(Path(zoo_dir) / "pretrained.safetensors")), strict=True)
    return ZooBackbone(module.to(DTYPES[dtype]), "cpu", source=str(zoo_dir))


def task_weights(zoo_dir: Path, task: str, keys: Any, dtype: str = "float32") -> StateDict:
    """θ_task restricted to ``keys`` (the mergeable names), in ``dtype``."""
    sd = load_file(str(Path(zoo_dir) / f"{task}.safetensors"))
    return {k: sd[k].to(DTYPES[dtype]) for k in keys}


def build(name: str, bb: Any, protocol: str, seed: int = 0, **options: Any):
    """``METHODS[name]`` with its ``Config`` defaults overridden by ``options``, validated."""
    from omegaconf import OmegaConf

    from otmf_exp.merging import METHODS
    from otmf_exp.merging.base import MethodContext

    cls = METHODS[name]
    cfg = OmegaConf.structured(cls.Config(**options))
    cls.validate(cfg)
    ctx = MethodContext(
        bb, torch.device("cpu"), torch.Generator().manual_seed(seed), progress=False, seed=seed
    )
    return cls(cfg, ctx, protocol=protocol)


def run(
    zoo_dir: Path,
    name: str,
    protocol: str,
    tasks: list[str] | None = None,
    dtype: str = "float32",
    with_data: bool = False,
    **options: Any,
) -> list[StateDict]:
    """θ₀ + τᵐ of method ``name`` after each step on the zoo (joint: one entry), ``vision_model.*`` keys."""
    from otmf_exp.merging.base import TaskInput

    bb = backbone(zoo_dir, dtype)
    method = build(name, bb, protocol, **options)
    pre = bb.pretrained_state()
    heads = load_file(str(Path(zoo_dir) / "heads.safetensors"))
    order = tasks or zoo_tasks(zoo_dir)

    def task(i: int, t: str) -> TaskInput:
        data = None
        if with_data:
            from otmf_exp.data.digits import build_task

            data = build_task(t)
            if dtype != "float32":  # the images in the model's dtype (as the reference side casts them)
                data.splits = {s: (x.to(DTYPES[dtype]), y) for s, (x, y) in data.splits.items()}
        head = heads[t].to(DTYPES[dtype])
        return TaskInput(t, i, task_weights(zoo_dir, t, pre, dtype), head, data, owned=True)

    if protocol == "joint":
        return [method.merged(method.joint(pre, iter([task(i, t) for i, t in enumerate(order)])), pre)]
    state, out = method.init(pre), []
    for i, t in enumerate(order):
        state = method.step(state, task(i, t), pre)
        out.append({k: v.detach().clone() for k, v in method.merged(state, pre).items()})
    return out


def run_steps(zoo_dir: Path, name: str, protocol: str, **kw: Any) -> dict[str, torch.Tensor]:
    """:func:`run` flattened as the reference side flattens (``step<i>/<key>``)."""
    return steps(run(zoo_dir, name, protocol, **kw))


def steps_of(name: str, protocol: str, **kw: Any) -> Callable[[Path, Path], dict[str, torch.Tensor]]:
    """A case's ``ours``: (zoo_dir, work_dir) -> :func:`run_steps` of method ``name`` with ``kw``."""

    def ours(zoo_dir: Path, work_dir: Path) -> dict[str, torch.Tensor]:
        return run_steps(zoo_dir, name, protocol, **kw)

    return ours
