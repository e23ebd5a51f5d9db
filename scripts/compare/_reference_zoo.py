"""Shared plumbing of the reference runners (run in the references' venv, no otmf_exp import): the
exported digits8 zoo as torch modules, our side's saved case, tracing of the references' own Adam."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn


class Zoo:
    """``otmf_exp.offline.zoo export`` output: θ₀, θ_t (vision-tower state dicts), heads, config."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.config = json.loads((self.root / "config.json").read_text())
        self.pretrained = load_file(str(self.root / "pretrained.safetensors"))
        self.heads = load_file(str(self.root / "heads.safetensors"))

    def finetuned(self, task: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.root / f"{task}.safetensors"))

    def tower(self, state: dict[str, torch.Tensor], with_projection: bool = True) -> nn.Module:
        from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

        cfg = CLIPVisionConfig(**self.config["module_config"])
        if with_projection:
            m = CLIPVisionModelWithProjection(cfg)
            m.load_state_dict(state)
        else:
            m = CLIPVisionModel(cfg)
            m.load_state_dict({k: v for k, v in state.items() if k.startswith("vision_model.")})
        return m.eval()


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


def accuracy(model, head, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * float((head(model(x)).argmax(-1) == y).float().mean())
