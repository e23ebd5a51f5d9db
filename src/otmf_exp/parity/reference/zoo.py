"""The exported digits8 zoo on the reference side (a minimal stand-in for the core helper's module):
θ₀, θ_t, heads and config as torch/transformers objects, with no otmf_exp import."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn


class Zoo:
    """``python -m otmf_exp.offline.zoo export`` output: vision-tower state dicts, heads, config."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.config = json.loads((self.root / "config.json").read_text())
        self.pretrained = load_file(str(self.root / "pretrained.safetensors"))
        self.heads = load_file(str(self.root / "heads.safetensors"))

    @property
    def tasks(self) -> list[str]:
        return list(self.config["tasks"])

    def finetuned(self, task: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.root / f"{task}.safetensors"))

    def state(self, name: str) -> dict[str, torch.Tensor]:
        return self.pretrained if name == "pretrained" else self.finetuned(name)

    def vision_config(self):
        from transformers import CLIPVisionConfig

        mc = dict(self.config["module_config"])
        return CLIPVisionConfig(**{k: v for k, v in mc.items() if k != "projection_dim"})

    def vision_model(self, name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
        """``CLIPVisionModel`` (keys ``vision_model.*``) holding θ₀ (``pretrained``) or θ_t."""
        from transformers import CLIPVisionModel

        m = CLIPVisionModel(self.vision_config())
        sd = {k: v for k, v in self.state(name).items() if k.startswith("vision_model.")}
        m.load_state_dict(sd, strict=True)
        return m.eval().to(dtype)

    def projection(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The pre-trained visual projection (a bias-free ``nn.Linear``), frozen; draws nothing from the
        global RNG (a reference seeded before it is built would see other noise)."""
        w = self.pretrained["visual_projection.weight"]
        lin = nn.utils.skip_init(nn.Linear, w.shape[1], w.shape[0], bias=False)
        lin.weight.data.copy_(w)
        return lin.to(dtype).requires_grad_(False)
