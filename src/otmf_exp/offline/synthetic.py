"""Synthetic stand-ins at real model size, for benchmarks (``scripts/bench.py``): no download, no data.

* :class:`SyntheticBackbone` -- the real HF ``CLIPVisionModelWithProjection`` architecture of
  ViT-B/32, B/16 or L/14 built from its config with random weights (same parameter count, same
  compute as the hub model), behind the same :class:`ClipVisionBackbone` every CLIP run uses.
  Fine-tuned weights are θ₀ + seeded Gaussian noise, generated when a task is loaded (never all
  held at once, like checkpoints read from disk); zero-shot heads are seeded random unit rows
  times CLIP's logit scale.
* :class:`SyntheticTaskData` -- random images produced per example from a seed when a batch is
  read (a stand-in for decoding from disk; nothing is held in memory).

The accuracies these produce are meaningless; time and memory are the real ones.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from otmf_exp.data.base import TaskData, index_plan
from otmf_exp.models.clip_vision import ClipVisionBackbone
from otmf_exp.models.hf_clip import autocast_context

#: HF CLIPVisionConfig fields of the paper's backbones (openai/clip-vit-*), plus a tiny one for smoke tests
ARCHS: dict[str, dict[str, int]] = {
    "vit_b32": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=32,
        projection_dim=512,
    ),
    "vit_b16": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=16,
        projection_dim=512,
    ),
    "vit_l14": dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        projection_dim=768,
    ),
    # ViT-B/32's widths with 4 of its 12 blocks: the bench's --quick size (same shapes per matrix)
    "vit_b32_l4": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=4,
        num_attention_heads=12,
        image_size=224,
        patch_size=32,
        projection_dim=512,
    ),
    "tiny": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    ),
}
LOGIT_SCALE = 100.0


def _seed(*parts: Any) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


class SyntheticTaskData(TaskData):
    """``num_classes`` classes, ``sizes[split]`` random ``[3, S, S]`` images per split, generated lazily."""

    def __init__(
        self,
        name: str,
        image_size: int,
        num_classes: int = 10,
        sizes: dict[str, int] | None = None,
        seed: int = 0,
    ) -> None:
        self.name = name
        self.image_size = image_size
        self.classnames = [f"class {i}" for i in range(num_classes)]
        self.sizes = dict(sizes or {"train": 64, "validation": 32, "test": 256})
        self.seed = seed

    def size(self, split: str) -> int:
        if split not in self.sizes:
            raise ValueError(f"task {self.name!r} has no split {split!r} (has {sorted(self.sizes)})")
        return self.sizes[split]

    def _example(self, split: str, i: int) -> Tensor:
        g = torch.Generator().manual_seed(_seed(self.seed, self.name, split, i))
        return torch.randn(3, self.image_size, self.image_size, generator=g)

    def loader(self, split, batch_size, *, shuffle=False, seed=0, fraction=1.0):
        for j in index_plan(self.size(split), batch_size, shuffle=shuffle, seed=seed, fraction=fraction):
            yield {
                "inputs": torch.stack([self._example(split, k) for k in j]),
                "labels": torch.tensor([k % len(self.classnames) for k in j]),
            }


class SyntheticBackbone(ClipVisionBackbone):
    """A real-size CLIP image tower with random weights; θ_t = θ₀ + ``noise``·N(0, 1) (seeded per task)."""

    def __init__(
        self,
        arch: str = "vit_b32",
        device: torch.device | str = "cpu",
        seed: int = 0,
        noise: float = 1e-3,
        autocast: str = "float32",
    ) -> None:
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        if arch not in ARCHS:
            raise ValueError(f"unknown synthetic arch {arch!r}; known: {sorted(ARCHS)}")
        self.arch, self.seed, self.noise = arch, seed, noise
        self.name = f"synthetic_{arch}"
        torch.manual_seed(seed)
        super().__init__(CLIPVisionModelWithProjection(CLIPVisionConfig(**ARCHS[arch])), device)
        self.image_size = ARCHS[arch]["image_size"]
        self.autocast = autocast
        autocast_context(self.device, autocast)  # validates the name

    def features(self, params: dict[str, Tensor], inputs: Tensor) -> Tensor:
        """As HF CLIP: ``backbone.autocast`` (bfloat16 | float16) wraps the forward on CUDA."""
        with autocast_context(self.device, self.autocast):
            return super().features(params, inputs).float()

    def identify_finetuned(self, task: str) -> None:
        """Nothing to record: θ_t is generated from the seed, not read from a file."""

    def load_finetuned(self, task: str) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(_seed(self.seed, "finetuned", task))
        out = {}
        for (
            k,
            v,
        ) in self.pretrained_state().items():  # one tensor of noise at a time, no full-size temporaries
            out[k] = v + self.noise * torch.randn(v.shape, generator=g, dtype=v.dtype).to(v.device)
        return out

    def zero_shot_head(self, task: Any) -> Tensor:
        g = torch.Generator().manual_seed(_seed(self.seed, "head", task.name))
        rows = torch.randn(len(task.classnames), ARCHS[self.arch]["projection_dim"], generator=g)
        return (LOGIT_SCALE * F.normalize(rows, dim=-1)).to(self.device)

    def task_data(self, name: str, sizes: dict[str, int] | None = None) -> SyntheticTaskData:
        return SyntheticTaskData(name, self.image_size, sizes=sizes, seed=self.seed)
