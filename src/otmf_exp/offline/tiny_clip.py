"""The offline suite's tiny CLIP image tower: recipe, pre-training, prototype heads, fine-tuning.

Recipe (deterministic, CPU, a couple of minutes on 2 cores):
  1. Pre-train a tiny ``CLIPVisionModelWithProjection`` (ViT, patch 2 on 8×8 images) on the
     clean digits with a cosine classifier -- the analogue of CLIP's pre-training.
  2. Zero-shot heads: for each task, the L2-normalised mean of the pre-trained image embeddings
     of ``shots`` labelled training images per class, times a fixed logit scale -- the analogue
     of CLIP's text-prompt class embeddings (fixed, weak).
  3. Fine-tune the vision tower only, on each task's train split, with its zero-shot head and
     the visual projection frozen -- exactly how FusionBench's CLIP task models were made.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from otmf_exp.data.base import TaskData

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TinyRecipe:
    """Every number that determines the suite's models; a change invalidates the cache (see ``zoo``)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    image_size: int = 8
    patch_size: int = 2
    projection_dim: int = 32
    pretrain_epochs: int = 30
    pretrain_lr: float = 1e-3
    finetune_epochs: int = 15
    finetune_lr: float = 5e-4
    batch_size: int = 64
    shots: int = 5
    logit_scale: float = 25.0
    seed: int = 0
    version: int = 1

    def as_dict(self) -> dict:
        return asdict(self)


def make_module(recipe: TinyRecipe):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        image_size=recipe.image_size,
        patch_size=recipe.patch_size,
        projection_dim=recipe.projection_dim,
        num_channels=3,
    )
    return CLIPVisionModelWithProjection(cfg)


def load_module(recipe: TinyRecipe, state: dict[str, Tensor]):
    """A tower of ``recipe``'s shape holding ``state`` (e.g. the cached pre-trained one), eval mode."""
    model = make_module(recipe)
    model.load_state_dict(state)
    return model.eval()


def _train(
    model, params: list[Tensor], head_fn, x: Tensor, y: Tensor, epochs: int, lr: float, bs: int, seed: int
) -> None:
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), bs):
            j = perm[i : i + bs]
            feats = model(pixel_values=x[j]).image_embeds
            loss = F.cross_entropy(head_fn(feats), y[j])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()


def pretrain(recipe: TinyRecipe, x: Tensor, y: Tensor):
    """Pre-train the tiny tower on clean digits; returns the module (eval mode)."""
    torch.manual_seed(recipe.seed)
    model = make_module(recipe)
    classes = torch.nn.Parameter(torch.randn(10, recipe.projection_dim) * 0.1)

    def head_fn(f: Tensor) -> Tensor:
        return recipe.logit_scale * F.normalize(f, dim=-1) @ F.normalize(classes, dim=-1).T

    _train(
        model,
        [*model.parameters(), classes],
        head_fn,
        x,
        y,
        recipe.pretrain_epochs,
        recipe.pretrain_lr,
        recipe.batch_size,
        recipe.seed,
    )
    return model


@torch.no_grad()
def prototype_head(model, data: TaskData, recipe: TinyRecipe) -> Tensor:
    """Zero-shot head ``[C, D]``: normalised class means of ``shots`` training images per class."""
    x, y = data.splits["train"]
    g = torch.Generator().manual_seed(recipe.seed)
    rows = []
    for c in range(len(data.classnames)):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)[: recipe.shots]]
        emb = F.normalize(model(pixel_values=x[idx]).image_embeds, dim=-1).mean(0)
        rows.append(F.normalize(emb, dim=-1))
    return recipe.logit_scale * torch.stack(rows)


def finetune(pre_state: dict[str, Tensor], recipe: TinyRecipe, data: TaskData, head: Tensor, seed: int):
    """Fine-tune the vision tower on ``data``'s train split with ``head`` and the projection frozen."""
    torch.manual_seed(seed)
    model = make_module(recipe)
    model.load_state_dict(pre_state)
    model.visual_projection.requires_grad_(False)
    x, y = data.splits["train"]
    _train(
        model,
        list(model.vision_model.parameters()),
        lambda f: F.normalize(f, dim=-1) @ head.T,
        x,
        y,
        recipe.finetune_epochs,
        recipe.finetune_lr,
        recipe.batch_size,
        seed,
    )
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("vision_model.")}
