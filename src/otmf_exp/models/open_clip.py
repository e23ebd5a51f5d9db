"""open_clip image encoders in the task_vectors layout (Ilharco et al. 2023, "Editing Models with
Task Arithmetic"; Wang et al. 2024, TALL masks).

Pre-trained: open_clip ``arch`` (``ViT-B-32`` ...) with ``pretrained_tag`` weights (``openai``:
QuickGELU, as the original task_vectors models), read from the hub repo named by the tag (or
``backbone.model_id``) -- so ``HF_HOME`` / ``HF_HUB_OFFLINE`` / ``backbone.local_dir`` apply.
``arch`` may also be a path to an open_clip model-config JSON (registered with
``open_clip.add_model_config``; its file stem is the architecture name).

Fine-tuned encoders: one *state-dict* file per task under ``backbone.checkpoint_dir``, found as
``<task>.safetensors|.pt|.pth|.bin`` or the task_vectors / TALL-masks layout
``<Name>/finetuned.pt``, ``<Name>Val/finetuned.pt``, ``<Name>Val/nonlinear_finetuned.pt``.
Files are read with ``torch.load(weights_only=True)``: task_vectors' original pickled
``ImageEncoder`` modules are refused with the command that converts them
(``scripts/convert_task_vectors_checkpoint.py``). Keys may carry ``model.`` / ``module.``
prefixes and may or may not start with ``visual.``.

Mergeable: every floating parameter of the image tower ``visual.*`` (the projection included:
task_vectors fine-tunes and merges the whole image encoder). Heads: the pre-trained text tower.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from otmf_exp.data.vision_tasks import TASK_VECTORS_NAMES
from otmf_exp.errors import UserError
from otmf_exp.hub import resolve
from otmf_exp.merging.task_vectors import StateDict
from otmf_exp.models.base import Backbone
from otmf_exp.models.checks import check_pretrained
from otmf_exp.models.heads import build_head, cached_head
from otmf_exp.models.hf_clip import autocast_context
from otmf_exp.runtime import digest

log = logging.getLogger(__name__)

CONVERTER = "scripts/convert_task_vectors_checkpoint.py"
WEIGHT_FILES = [
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
]
_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


class OpenClipTower(nn.Module):
    """The image tower of an open_clip model under the name ``visual`` (its CLIP state-dict prefix)."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, images: Tensor) -> Tensor:
        return self.visual(images)


class TorchvisionBatchTransform:
    """Picklable batch transform: list of PIL images -> ``[B, 3, H, W]`` with open_clip's eval preprocess."""

    def __init__(self, preprocess: Any) -> None:
        self.preprocess = preprocess

    def __call__(self, images: list[Any]) -> Tensor:
        return torch.stack([self.preprocess(im.convert("RGB")) for im in images])


def register_arch(arch: str) -> str:
    """Architecture name; a path to a model-config JSON is registered first (name = file stem)."""
    import open_clip

    if arch.endswith(".json"):
        p = Path(arch).expanduser()
        if not p.is_file():
            raise UserError(f"open_clip model config {p} (backbone.arch) does not exist")
        open_clip.add_model_config(p)
        return p.stem
    if open_clip.get_model_config(arch) is None:
        raise UserError(
            f"unknown open_clip architecture {arch!r} (backbone.arch); e.g. ViT-B-32, ViT-B-16, ViT-L-14"
        )
    return arch


def load_state_dict_file(path: Path) -> dict[str, Tensor]:
    """A state dict from a safetensors / torch file, refusing pickled modules (weights_only=True)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(
            f"{path} is a pickled whole model (task_vectors format), not a state dict; convert it once with "
            f"`python {CONVERTER} {path} --out {path.with_suffix('.safetensors')}` (needs the code that "
            f"pickled it importable) and use the converted file"
        ) from None
    except Exception as e:
        raise UserError(
            f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserError(f"{path} does not hold a state dict (name -> tensor)")
    return dict(obj)


def normalise_keys(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Strip ``module.`` / ``model.`` prefixes; keep ``visual.*`` (bare image-tower keys get the prefix)."""
    out = {}
    for k, v in sd.items():
        while k.startswith(("module.", "model.")):
            k = k.split(".", 1)[1]
        out[k] = v
    if not any(k.startswith("visual.") for k in out):
        out = {f"visual.{k}": v for k, v in out.items()}
    return {k: v for k, v in out.items() if k.startswith("visual.")}


def find_checkpoint(checkpoint_dir: Path, task: str) -> Path:
    cands = [checkpoint_dir / f"{task}{s}" for s in _SUFFIXES]
    name = TASK_VECTORS_NAMES.get(task)
    if name:
        cands += [
            checkpoint_dir / name / "finetuned.pt",
            checkpoint_dir / f"{name}Val" / "finetuned.pt",
            checkpoint_dir / f"{name}Val" / "nonlinear_finetuned.pt",
        ]
    for c in cands:
        if c.is_file():
            return c
    raise UserError(
        f"no fine-tuned checkpoint for task {task!r} in backbone.checkpoint_dir={checkpoint_dir}; "
        f"expected {cands[0].name} or {cands[1].name}" + (f" or {name}/finetuned.pt" if name else "")
    )


class OpenClipBackbone(Backbone):
    """open_clip image tower run functionally with merged ``visual.*`` weights."""

    modality = "vision"

    def __init__(self, cfg: Any, device: torch.device | str = "cpu") -> None:
        import open_clip

        if not cfg.get("arch"):
            raise UserError(f"backbone {cfg.name!r} (kind open_clip) needs backbone.arch")
        if not cfg.get("checkpoint_dir"):
            raise UserError(
                f"backbone {cfg.name!r} needs backbone.checkpoint_dir: the directory of fine-tuned "
                f"state-dict files, one per task (<task>.pt or <Name>/finetuned.pt)"
            )
        self.checkpoint_dir = Path(cfg.checkpoint_dir).expanduser()
        if not self.checkpoint_dir.is_dir():
            raise UserError(f"backbone.checkpoint_dir={self.checkpoint_dir} is not a directory")
        self.name = cfg.name
        self.device = torch.device(device)
        self.autocast = cfg.get("autocast", "float32")
        autocast_context(self.device, self.autocast)
        self.arch = register_arch(cfg.arch)
        tag = cfg.get("pretrained_tag")
        tag_cfg = open_clip.get_pretrained_cfg(self.arch, tag) if tag else {}
        self.weights = self._weights_file(cfg, tag, tag_cfg)
        kwargs = {
            k2: tag_cfg[k]
            for k, k2 in (
                ("mean", "image_mean"),
                ("std", "image_std"),
                ("interpolation", "image_interpolation"),
                ("resize_mode", "image_resize_mode"),
            )
            if k in tag_cfg
        }
        model, _, preprocess = open_clip.create_model_and_transforms(
            self.arch,
            pretrained=str(self.weights),
            force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
            weights_only=True,
            **kwargs,
        )
        self.clip = model.to(self.device).eval().requires_grad_(False)
        self.module = OpenClipTower(self.clip.visual)
        check_pretrained(self.module, str(self.weights))
        self._mergeable = [n for n, p in self.module.named_parameters() if p.is_floating_point()]
        self.tokenizer = open_clip.get_tokenizer(self.arch)
        self.image_transform = TorchvisionBatchTransform(preprocess)
        self.key = f"open_clip:{self.arch}:{tag or cfg.get('model_id')}"

    @staticmethod
    def _weights_file(cfg: Any, tag: str | None, tag_cfg: dict) -> Path:
        if tag and not tag_cfg and os.path.isfile(os.path.expanduser(tag)):
            return Path(tag).expanduser()  # pretrained_tag given as a weights file
        repo, files = cfg.get("model_id"), list(WEIGHT_FILES)
        if not repo:
            hf = tag_cfg.get("hf_hub", "")
            if not hf:
                raise UserError(
                    f"open_clip {cfg.arch}/{tag}: set backbone.model_id to the hub repo of its weights"
                )
            repo, fname = (hf.rstrip("/"), "") if hf.endswith("/") else os.path.split(hf)
            if fname:
                files.insert(0, fname)
        return resolve.resolve_model_file(repo, files, cfg.get("local_dir"))

    def mergeable_names(self) -> list[str]:
        return list(self._mergeable)

    def features(self, params: StateDict, inputs: Tensor) -> Tensor:
        with autocast_context(self.device, self.autocast):
            out = self.call(params, inputs)
        return out.float()

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        return self.clip.encode_text(self.tokenizer(texts).to(self.device))

    def zero_shot_head(self, task: Any) -> Tensor:
        def compute() -> Tensor:
            return build_head(
                self.encode_text, task.classnames, task.templates, self.clip.logit_scale.exp().item()
            )

        head = cached_head(self.key, resolve.dir_fingerprint(self.weights), task, compute)
        return self.checked_head(head, task, "the zero-shot head cache").to(self.device)

    def identify_finetuned(self, task: str) -> None:
        digest.record(find_checkpoint(self.checkpoint_dir, task))

    def load_finetuned(self, task: str) -> StateDict:
        path = find_checkpoint(self.checkpoint_dir, task)
        digest.record(path)  # task_vectors layout: a file outside the hub resolver
        sd = normalise_keys(load_state_dict_file(path))
        return self.validate_finetuned(task, sd, str(path))

    # ---- export (save_merged) -------------------------------------------------------------------
    def save_model(self, weights: StateDict, out_dir: Any) -> dict[str, Any]:
        """The full open_clip model's state dict (merged ``visual.*``, text tower and logit scale from
        θ₀) in ``open_clip_model.safetensors``, + the architecture's config as ``open_clip_config.json``."""
        import open_clip
        from safetensors.torch import save_file

        from otmf_exp.runtime import files

        sd = {k: v.detach().cpu().clone().contiguous() for k, v in self.clip.state_dict().items()}
        sd.update({k: v.detach().cpu().clone().contiguous() for k, v in weights.items()})
        save_file(sd, str(Path(out_dir) / "open_clip_model.safetensors"))
        files.write_json(
            Path(out_dir) / "open_clip_config.json", {"model_cfg": open_clip.get_model_config(self.arch)}
        )
        return {
            "loader": (
                f"m = open_clip.create_model({self.arch!r}); "
                "m.load_state_dict(safetensors.torch.load_file(dir/'open_clip_model.safetensors'))"
            ),
            "arch": self.arch,
            "features": "model.encode_image(images)",
        }
