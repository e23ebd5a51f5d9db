"""The reference side's view of an exported digits8 zoo (torch, transformers, safetensors only).

``python -m otmf_exp.offline.zoo export DIR`` writes ``pretrained.safetensors``, one
``<task>.safetensors`` per task (``CLIPVisionModelWithProjection`` state dicts), ``heads.safetensors``
and ``config.json``; this class turns them into the objects the references take: state dicts,
HF ``CLIPVisionModel`` towers (FusionBench's CLIP model class) and ``save_pretrained`` checkpoints
for FusionBench's path-based model pools.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

PRETRAINED = "_pretrained_"  # FusionBench's model-pool name of θ₀


class Zoo:
    """θ₀, θ_t (vision-tower state dicts), zero-shot heads and the tower config of an exported zoo."""

    def __init__(self, root: Path, dtype: torch.dtype = torch.float32) -> None:
        self.root = Path(root)
        self.dtype = dtype
        self.config = json.loads((self.root / "config.json").read_text())
        self.tasks: list[str] = list(self.config["tasks"])
        self.pretrained = self._cast(load_file(str(self.root / "pretrained.safetensors")))
        self.heads = load_file(str(self.root / "heads.safetensors"))

    def _cast(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in sd.items()}

    def finetuned(self, task: str) -> dict[str, torch.Tensor]:
        """θ_t of ``task`` (the full ``CLIPVisionModelWithProjection`` state dict)."""
        return self._cast(load_file(str(self.root / f"{task}.safetensors")))

    def state(self, name: str) -> dict[str, torch.Tensor]:
        """θ₀ for ``"pretrained"`` / ``"_pretrained_"``, else θ_name."""
        return dict(self.pretrained) if name in ("pretrained", PRETRAINED) else self.finetuned(name)

    def vision_config(self):
        """The tower's ``CLIPVisionConfig`` (fields this transformers version knows)."""
        from transformers import CLIPVisionConfig

        keep = set(CLIPVisionConfig().to_dict()) - {"transformers_version", "architectures", "dtype"}
        return CLIPVisionConfig(**{k: v for k, v in self.config["module_config"].items() if k in keep})

    def tower(
        self,
        which: str | dict[str, torch.Tensor],
        with_projection: bool = False,
        dtype: torch.dtype | None = None,
    ) -> nn.Module:
        """``which`` (a model's name or a state dict) in an HF ``CLIPVisionModel`` (``vision_model.*``;
        FusionBench's CLIP pools) or, with ``with_projection``, a ``CLIPVisionModelWithProjection``;
        in ``dtype`` (default: the zoo's)."""
        from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

        sd = self.state(which) if isinstance(which, str) else dict(which)
        if with_projection:
            model = CLIPVisionModelWithProjection(self.vision_config())
        else:
            model = CLIPVisionModel(self.vision_config())
            sd = vision_only(sd)
        model.load_state_dict(sd, strict=True)
        return model.to(dtype or self.dtype).eval()

    def towers(self, tasks: list[str] | None = None) -> dict[str, nn.Module]:
        """``{"_pretrained_": θ₀, task: θ_t, ...}`` as ``CLIPVisionModel`` (a model pool's models)."""
        names = tasks or self.tasks
        return {PRETRAINED: self.tower(PRETRAINED), **{t: self.tower(t) for t in names}}

    def save_towers(self, out: Path, tasks: list[str] | None = None) -> dict[str, str]:
        """The towers as ``save_pretrained`` checkpoints under ``out``: ``{pool name: path}``."""
        paths = {}
        for name, model in self.towers(tasks).items():
            paths[name] = str(Path(out) / name)
            model.save_pretrained(paths[name])
        return paths

    def projection(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """The pre-trained ``visual_projection`` (frozen), as FusionBench's CLIP algorithms hold it.
        Built without an init, so it draws nothing from the global RNG (a reference seeded before it
        is built sees the same noise as ours)."""
        w = self.pretrained["visual_projection.weight"]
        proj = nn.utils.skip_init(nn.Linear, w.shape[1], w.shape[0], bias=False)
        proj.weight.data.copy_(w)
        return proj.to(dtype or self.dtype).requires_grad_(False)


def vision_only(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``vision_model.*`` entries (the mergeable tower; the projection stays θ₀'s)."""
    return {k: v for k, v in sd.items() if k.startswith("vision_model.")}


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``model``'s state dict (what a reference function returns)."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def steps(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-step state dicts flattened to one dict, ``step<i>/<key>`` (i from 1)."""
    return {f"step{i}/{k}": v for i, sd in enumerate(states, start=1) for k, v in sd.items()}


def continual_steps(cls: type, zoo: Zoo, **kwargs) -> dict[str, torch.Tensor]:
    """Run a FusionBench-style continual algorithm ``cls(**kwargs)`` (with ``save_on_every_step``) on the
    zoo's towers in order, no loggers, nothing written: the merged tower after every step (:func:`steps`)."""
    import types

    from fusion_bench.modelpool import BaseModelPool

    captured: list[dict[str, torch.Tensor]] = []

    class Captured(cls):
        log_dir = None  # no loggers, nothing written

        def save_merged_model(self, merged_model, step):  # its per-step hook: capture the model
            captured.append(state_of(merged_model))

    algo = Captured(shuffle_order=False, seed=None, save_on_every_step=True, **kwargs)
    algo._program = types.SimpleNamespace(taskpool=types.SimpleNamespace(_test_datasets={}))
    algo.run(BaseModelPool(models=zoo.towers()))
    return steps(captured)


def save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Save named tensors (contiguous, detached) as safetensors."""
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))


class Encoder(nn.Module):
    """Plays the OTMF authors' ``ImageEncoder`` (images -> embedding; the tower under ``.model``, so
    the state-dict keys are ``model.*`` as theirs)."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.model = tower
        self.train_preprocess = self.val_preprocess = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=images).image_embeds


def tracing_adam(trace: list, lr: float | None = None) -> type:
    """``torch.optim.Adam`` that appends its (first) parameter after every step to ``trace``; ``lr``
    replaces the learning rate a script hard-codes (cases off the authors' constants)."""

    class TracingAdam(torch.optim.Adam):
        def __init__(self, params, **kw):
            super().__init__(params, **({**kw, "lr": lr} if lr is not None else kw))

        def step(self, closure=None):
            out = super().step(closure)
            trace.append(self.param_groups[0]["params"][0].detach().clone())
            return out

    return TracingAdam


def logged(name: str, it, log: list):
    """Yield from ``it``, recording ``(name, images)`` of every batch (images = batch[0])."""
    for b in it:
        log.append((name, b[0]))
        yield b
