"""CLIP image towers (HF ``CLIPVisionModelWithProjection``): shared by the tiny offline model and HF CLIP.

Features for OTMF are the projected image embedding ``image_embeds`` (before the head's L2
normalisation). Only the vision transformer (``vision_model.*``) is mergeable; the visual
projection always comes from the pre-trained model, as in FusionBench's CLIP pools.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from otmf_exp.merging.task_vectors import StateDict
from otmf_exp.models.base import Backbone
from otmf_exp.models.checks import check_pretrained


class ClipVisionBackbone(Backbone):
    """A frozen ``CLIPVisionModelWithProjection`` run functionally with merged vision-tower weights."""

    modality = "vision"

    def __init__(
        self, module: Any, device: torch.device | str = "cpu", source: str = "the pre-trained tower"
    ) -> None:
        check_pretrained(module, source)
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.module.requires_grad_(False)
        self._mergeable = [
            n
            for n, p in self.module.named_parameters()
            if n.startswith("vision_model.") and p.is_floating_point()
        ]

    def mergeable_names(self) -> list[str]:
        return list(self._mergeable)

    def embed_dim(self) -> int | None:
        return getattr(getattr(self.module, "visual_projection", None), "out_features", None)

    def features(self, params: StateDict, inputs: Tensor) -> Tensor:
        return self.call(params, pixel_values=inputs).image_embeds

    def save_model(self, weights: StateDict, out_dir: Any) -> dict[str, Any]:
        """``CLIPVisionModelWithProjection.save_pretrained``: the merged tower + the pre-trained projection."""
        from otmf_exp.models.export import with_weights

        with_weights(self.module, weights).save_pretrained(out_dir)
        return {
            "loader": "transformers.CLIPVisionModelWithProjection.from_pretrained(dir)",
            "features": "image_embeds",
        }
