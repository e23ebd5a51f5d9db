"""HF transformers CLIP (``openai/clip-vit-*``) with FusionBench's fine-tuned vision towers.

Pre-trained: ``CLIPModel`` -- its text tower, text projection, visual projection and logit scale
are always the pre-trained ones. Fine-tuned: ``CLIPVisionModel`` towers
``tanganke/clip-vit-base-patch32_<task>`` (Tang et al. 2024, FusionBench). Mergeable: the vision
transformer (``vision_model.*``) only. Features for OTMF: the projected image embedding.
Preprocessing: the model's own ``CLIPImageProcessor`` (RGB, shortest side 224 bicubic, centre
crop 224, CLIP mean/std).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from otmf_exp.errors import UserError
from otmf_exp.hub import resolve
from otmf_exp.merging.task_vectors import StateDict
from otmf_exp.models.checks import from_pretrained
from otmf_exp.models.clip_vision import ClipVisionBackbone
from otmf_exp.models.heads import build_head, cached_head

log = logging.getLogger(__name__)

AUTOCAST = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_context(device: torch.device, name: str) -> Any:
    """``torch.autocast`` on CUDA for ``bfloat16`` / ``float16``; a no-op for ``float32`` or on CPU."""
    if name not in AUTOCAST:
        raise UserError(f"backbone.autocast must be one of {sorted(AUTOCAST)}, got {name!r}")
    dtype = AUTOCAST[name]
    if dtype is None or device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def require(cfg: Any, *fields: str) -> None:
    for f in fields:
        if not cfg.get(f):
            raise UserError(f"backbone {cfg.name!r} (kind {cfg.kind}) needs backbone.{f}")


class ImageTower(nn.Module):
    """Vision transformer + visual projection, sharing the ``CLIPModel``'s parameters (no copy)."""

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)


class HFImageTransform:
    """Picklable batch transform: list of PIL images -> pixel tensor ``[B, 3, H, W]``."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, images: list[Any]) -> Tensor:
        return self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")[
            "pixel_values"
        ]


class HFClipBackbone(ClipVisionBackbone):
    """``CLIPModel`` image tower run functionally with merged ``vision_model.*`` weights."""

    def __init__(self, cfg: Any, device: torch.device | str = "cpu") -> None:
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        require(cfg, "model_id", "finetuned")
        self.name = cfg.name
        self.model_id = cfg.model_id
        self.finetuned_pattern = cfg.finetuned
        self.local_dir = cfg.local_dir
        self.autocast = cfg.get("autocast", "float32")
        autocast_context(torch.device(device), self.autocast)  # validates the name
        self.path = resolve.resolve_model_dir(cfg.model_id, cfg.local_dir)
        clip = from_pretrained(CLIPModel, self.path, dtype=torch.float32)
        super().__init__(ImageTower(clip.vision_model, clip.visual_projection), device, str(self.path))
        self.clip = clip.to(self.device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.image_transform = HFImageTransform(AutoImageProcessor.from_pretrained(self.path))

    # ---- forward -----------------------------------------------------------------------------
    def features(self, params: StateDict, inputs: Tensor) -> Tensor:
        with autocast_context(self.device, self.autocast):
            out = self.call(params, pixel_values=inputs)
        return out.float()

    # ---- heads --------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        max_len = self.clip.config.text_config.max_position_embeddings
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        tok = {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
        pooled = self.clip.text_model(**tok).pooler_output
        return self.clip.text_projection(pooled)

    def zero_shot_head(self, task: Any) -> Tensor:
        def compute() -> Tensor:
            return build_head(
                self.encode_text, task.classnames, task.templates, self.clip.logit_scale.exp().item()
            )

        head = cached_head(f"hf_clip:{self.model_id}", resolve.dir_fingerprint(self.path), task, compute)
        return self.checked_head(head, task, "the zero-shot head cache").to(self.device)

    # ---- fine-tuned towers ----------------------------------------------------------------------
    def finetuned_id(self, task: str) -> str:
        return self.finetuned_pattern.format(task=task)

    def identify_finetuned(self, task: str) -> None:
        resolve.resolve_model_dir(self.finetuned_id(task), self.local_dir)  # records its digest

    def load_finetuned(self, task: str) -> StateDict:
        from transformers import CLIPVisionModel

        repo = self.finetuned_id(task)
        path = resolve.resolve_model_dir(repo, self.local_dir)
        tower = from_pretrained(CLIPVisionModel, path, dtype=torch.float32)
        vm = getattr(tower, "vision_model", tower)  # transformers 4: .vision_model; 5: the model itself
        sd = {f"vision_model.{k}": v for k, v in vm.state_dict().items()}
        return self.validate_finetuned(task, sd, repo)

    # ---- export (save_merged) -------------------------------------------------------------------
    def save_model(self, weights: StateDict, out_dir: Any) -> dict[str, Any]:
        """A ``CLIPVisionModelWithProjection`` (merged vision tower, pre-trained visual projection) + the
        image processor, loadable with ``from_pretrained(dir)`` (``image_embeds`` = our features)."""
        import copy

        from transformers import CLIPVisionModelWithProjection

        vc = copy.deepcopy(self.clip.config.vision_config)
        vc.projection_dim = self.clip.config.projection_dim
        tower = CLIPVisionModelWithProjection(vc).eval()
        sd = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        sd.update({k: v.detach().cpu() for k, v in weights.items()})
        tower.load_state_dict(sd, strict=True)
        tower.save_pretrained(out_dir)
        self.image_transform.processor.save_pretrained(out_dir)
        return {
            "loader": "transformers.CLIPVisionModelWithProjection.from_pretrained(dir)",
            "features": "image_embeds",
            "preprocessing": "AutoImageProcessor.from_pretrained(dir)",
        }
