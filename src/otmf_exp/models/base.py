"""The backbone interface shared by the tiny offline model, HF/open_clip CLIP and Flan-T5.

A backbone owns the pre-trained module (θ₀, frozen) and runs it with any mergeable weights
through ``torch.func.functional_call`` -- no model copies are made for merged, teacher or
student weights. It decides, in one place, which parameters are mergeable.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from otmf_exp.errors import UserError
from otmf_exp.merging.task_vectors import StateDict
from otmf_exp.models.checks import check_head, check_logits, check_state
from otmf_exp.models.functional import ComputedParams, computed_parameters


def head_logits(feats: Tensor, head: Tensor) -> Tensor:
    """Logits ``normalize(f) @ W.T + b`` of features ``[B, D]``. A head ``[C, D]`` is ``W`` alone
    (the CLIP zero-shot head, logit scale folded in); a head ``[C, D+1]`` carries its bias ``b`` in
    the last column (a tuned head: one tensor per task, so states and checkpoints need no special case)."""
    x = F.normalize(feats, dim=-1)
    d = x.shape[-1]
    if head.shape[-1] == d + 1:
        return torch.addmm(head[:, d], x, head[:, :d].T)
    return x @ head.T


class Backbone(ABC):
    """One model family. Subclasses set ``module`` (with θ₀ loaded) and implement the loaders."""

    name: str
    modality: str = "vision"
    module: nn.Module
    device: torch.device
    #: inputs per batch for evaluation / feature extraction, data-loader workers (set from config)
    batch_size: int = 128
    num_workers: int = 0
    #: where an evaluation happens, for its non-finite-logits line (the runner sets "at step N")
    eval_where: str = ""

    # ---- parameters ---------------------------------------------------------------------
    @abstractmethod
    def mergeable_names(self) -> list[str]:
        """Names of the parameters every method merges (identical for every method)."""

    def pretrained_state(self) -> StateDict:
        """θ₀ restricted to the mergeable parameters (detached views of the module's tensors)."""
        params = dict(self.module.named_parameters())
        return {n: params[n].detach() for n in self.mergeable_names()}

    @abstractmethod
    def load_finetuned(self, task: str) -> StateDict:
        """θ_t for ``task`` (mergeable parameters only), validated against θ₀."""

    def identify_finetuned(self, task: str) -> None:
        """Record (:func:`otmf_exp.runtime.digest.record`) the digests :meth:`load_finetuned` records
        for ``task``, without reading its weights where the files can be found alone (resume checks
        the models of finished steps this way); this default loads them."""
        self.load_finetuned(task)

    def linear_weight_names(self) -> set[str]:
        """Mergeable 2-D weights owned by ``nn.Linear`` modules (decided by module type, not by name)."""
        names = set(self.mergeable_names())
        out = set()
        for mod_name, mod in self.module.named_modules():
            if isinstance(mod, nn.Linear):
                full = f"{mod_name}.weight" if mod_name else "weight"
                if full in names:
                    out.add(full)
        return out

    def direct_params_of_nonleaf(self) -> set[str]:
        """Mergeable parameters owned directly by a module that has children (e.g. CLIP's class token)."""
        names = set(self.mergeable_names())
        out = set()
        for mod_name, mod in self.module.named_modules():
            if len(list(mod.children())) == 0:
                continue
            for p_name, _ in mod.named_parameters(recurse=False):
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                if full in names:
                    out.add(full)
        return out

    def validate_finetuned(self, task: str, sd: dict[str, Tensor], source: str) -> StateDict:
        """θ_t checked against θ₀ (keys, shapes, floating dtype, finite; see :mod:`.checks`)."""
        return check_state(sd, self.pretrained_state(), f"checkpoint for task {task!r} ({source})")

    def embed_dim(self) -> int | None:
        """Embedding width a head's columns must match (None: not checked)."""
        return None

    def checked_head(self, head: Tensor, task: Any, source: str) -> Tensor:
        """A zero-shot/tuned head checked (rows = classes, columns = embedding, dtype, finite)."""
        names = getattr(task, "classnames", None)
        name = getattr(task, "name", task)
        return check_head(
            head, len(names) if names else None, self.embed_dim(), f"head of task {name!r} ({source})"
        )

    # ---- export -----------------------------------------------------------------------------
    def save_model(self, weights: StateDict, out_dir: Any) -> dict[str, Any]:
        """Write the model with ``weights`` (mergeable parameters) into ``out_dir`` in the format of the
        backbone's own loader; return what the card records (``loader``, ``files``, notes)."""
        raise UserError(f"save_merged: backbone {self.name!r} has no loadable model format")

    # ---- heads and forward ----------------------------------------------------------------
    def zero_shot_head(self, task: Any) -> Tensor | None:
        """Zero-shot head ``[C, D]`` (logit scale folded in), or None for text-to-text models."""
        return None

    def call(self, params: StateDict, *args: Any, **kwargs: Any) -> Any:
        """Run the pre-trained module with ``params`` replacing its mergeable parameters (a dict, or
        :class:`~otmf_exp.models.functional.ComputedParams`: weights made per module as it runs)."""
        if isinstance(params, ComputedParams):
            with computed_parameters(self.module, params):
                return self.module(*args, **kwargs)
        return functional_call(self.module, params, args, kwargs, strict=False)

    @abstractmethod
    def features(self, params: StateDict, inputs: Any) -> Tensor:
        """Encoder output embedding ``[B, D]`` (before any normalisation)."""

    def logits_from_features(self, feats: Tensor, head: Tensor) -> Tensor:
        """CLIP-style logits of a head ``[C, D]`` or ``[C, D+1]`` (see :func:`head_logits`)."""
        return head_logits(feats, head)

    def logits(self, params: StateDict, head: Tensor | None, inputs: Any) -> Tensor:
        """Logits used for evaluation and entropy (vision: head over features)."""
        return self.logits_from_features(self.features(params, inputs), head)

    def to_device(self, inputs: Any) -> Any:
        if isinstance(inputs, Tensor):
            return inputs.to(self.device, non_blocking=True)
        if isinstance(inputs, dict):
            return {k: self.to_device(v) for k, v in inputs.items()}
        return inputs

    @torch.inference_mode()
    def evaluate(
        self, params: StateDict, head: Tensor | None, data: Any, split: str, batch_size: int
    ) -> float:
        """Accuracy (%) of weights ``params`` with ``head`` on ``split`` of ``data``."""
        correct = total = 0
        for batch in data.loader(split, batch_size):
            logits = self.logits(params, head, self.to_device(batch["inputs"]))
            check_logits(logits, f"{self.eval_where} on task {data.name!r} ({split} split)".lstrip())
            pred = logits.argmax(-1).cpu()
            correct += int((pred == batch["labels"]).sum())
            total += len(batch["labels"])
        if total == 0:
            raise UserError(f"task {data.name!r}: split {split!r} is empty; nothing to evaluate")
        return 100.0 * correct / total
