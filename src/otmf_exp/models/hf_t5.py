"""Flan-T5 (Chung et al. 2022) on GLUE as text-to-text, with FusionBench's fine-tunes (Tang et al. 2024).

Pre-trained ``google/flan-t5-base``; fine-tuned ``tanganke/flan-t5-base_glue-<task>`` (``variant:
full``) or LoRA r=16 adapters ``tanganke/flan-t5-base_glue-<task>_lora-16`` (``variant: lora``:
``peft.PeftModel.from_pretrained`` on a fresh base, then ``merge_and_unload``). Mergeable: every
floating parameter (tied embeddings counted once, as ``shared.weight``).

How the method interface maps onto a generative model:

* ``features`` (OTMF): the encoder's last hidden state, mean-pooled over non-pad tokens
  (``backbone.features=mean_pool``) or the first token's state (``first_token``).
* ``logits(params, None, inputs)`` (AdaMerging's entropy): vocabulary logits of the first decoder
  step, i.e. the distribution of the first answer token.
* ``evaluate``: greedy ``generate(max_new_tokens)`` with the merged weights, decoded and compared
  with the label text (exact match, %), or Spearman ρ × 100 for ``stsb``.
  ``generate`` is not a single forward, so ``functional_call`` cannot wrap it: the weights are
  swapped in with :func:`otmf_exp.models.functional.swapped_parameters` and restored afterwards.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from otmf_exp.data.glue import score
from otmf_exp.errors import UserError
from otmf_exp.hub import resolve
from otmf_exp.merging.task_vectors import StateDict
from otmf_exp.models.base import Backbone
from otmf_exp.models.checks import check_pretrained, from_pretrained
from otmf_exp.models.functional import (
    ComputedParams,
    computed_parameters,
    submodule_params,
    swapped_parameters,
)
from otmf_exp.models.hf_clip import autocast_context, require

log = logging.getLogger(__name__)


class T5Backbone(Backbone):
    """A frozen ``T5ForConditionalGeneration`` run with merged weights."""

    modality = "text"

    def __init__(self, cfg: Any, device: torch.device | str = "cpu") -> None:
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        require(cfg, "model_id", "finetuned")
        if cfg.variant not in ("full", "lora"):
            raise UserError(f"backbone.variant must be full or lora, got {cfg.variant!r}")
        if cfg.variant == "lora":
            require(cfg, "finetuned_lora")
        if cfg.features not in ("mean_pool", "first_token"):
            raise UserError(f"backbone.features must be mean_pool or first_token, got {cfg.features!r}")
        self.name = cfg.name
        self.device = torch.device(device)
        self.autocast = cfg.get("autocast", "float32")
        autocast_context(self.device, self.autocast)
        self.model_id, self.local_dir, self.variant = cfg.model_id, cfg.local_dir, cfg.variant
        self.finetuned_pattern = cfg.finetuned_lora if cfg.variant == "lora" else cfg.finetuned
        self.pooling = cfg.features
        self.max_new_tokens = int(cfg.get("max_new_tokens", 10))
        self.max_input_length = int(cfg.get("max_input_length", 512))
        self.path = resolve.resolve_model_dir(cfg.model_id, cfg.local_dir)
        self._auto = AutoModelForSeq2SeqLM
        self.module = from_pretrained(AutoModelForSeq2SeqLM, self.path, dtype=torch.float32)
        check_pretrained(self.module, str(self.path))
        self.module.to(self.device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self._mergeable = [n for n, p in self.module.named_parameters() if p.is_floating_point()]
        c = self.module.config
        self.start_id = c.decoder_start_token_id if c.decoder_start_token_id is not None else c.pad_token_id

    def mergeable_names(self) -> list[str]:
        return list(self._mergeable)

    # ---- forward -----------------------------------------------------------------------------
    def features(self, params: StateDict, inputs: dict[str, Tensor]) -> Tensor:
        mask = inputs["attention_mask"]
        kwargs = {"input_ids": inputs["input_ids"], "attention_mask": mask}
        with autocast_context(self.device, self.autocast):
            if isinstance(params, ComputedParams):  # weights made per module as it runs
                with computed_parameters(self.module, params):
                    h = self.module.encoder(**kwargs).last_hidden_state.float()
            else:
                enc = submodule_params(self.module, params, "encoder")
                h = functional_call(
                    self.module.encoder, enc, (), kwargs, strict=False
                ).last_hidden_state.float()
        if self.pooling == "first_token":
            return h[:, 0]
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)

    def logits(self, params: StateDict, head: Tensor | None, inputs: dict[str, Tensor]) -> Tensor:
        ids = inputs["input_ids"]
        dec = torch.full((ids.shape[0], 1), self.start_id, dtype=torch.long, device=ids.device)
        with autocast_context(self.device, self.autocast):
            out = self.call(
                params,
                input_ids=ids,
                attention_mask=inputs["attention_mask"],
                decoder_input_ids=dec,
                use_cache=False,
            )
        return out.logits[:, 0, :].float()

    @torch.inference_mode()
    def generate_text(self, params: StateDict, inputs: dict[str, Tensor]) -> list[str]:
        """Greedy answers of the model with weights ``params`` (swapped in, then restored)."""
        with swapped_parameters(self.module, params), autocast_context(self.device, self.autocast):
            out = self.module.generate(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                num_beams=1,
            )
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)

    @torch.inference_mode()
    def evaluate(
        self, params: StateDict, head: Tensor | None, data: Any, split: str, batch_size: int
    ) -> float:
        """Exact match (%) of generated vs label text; Spearman ρ × 100 for regression tasks (stsb)."""
        preds: list[str] = []
        targets: list[str] = []
        for batch in data.loader(split, batch_size):
            preds += self.generate_text(params, self.to_device(batch["inputs"]))
            targets += list(batch["targets"])
        if not targets:
            raise UserError(f"task {data.name!r}: split {split!r} is empty; nothing to evaluate")
        return score(preds, targets, getattr(data, "metric", "exact_match"))

    # ---- token-level helpers (MINGLE's test-time adaptation: teacher answers, per-token logits) -----
    @torch.no_grad()
    def generate_ids(self, params: StateDict, inputs: dict[str, Tensor], max_new_tokens: int) -> Tensor:
        """Greedy answer tokens ``[B, L]`` (starting with the decoder start token, pad after EOS)."""
        with swapped_parameters(self.module, params), autocast_context(self.device, self.autocast):
            return self.module.generate(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
            )

    def target_ids(self, targets: list[str]) -> Tensor:
        """Label texts tokenized (EOS appended), right-padded with the pad token: ``[B, L]``."""
        enc = self.tokenizer(list(targets), padding=True, return_tensors="pt")
        return enc["input_ids"].to(self.device)

    def seq2seq_logits(self, params: StateDict, inputs: dict[str, Tensor], labels: Tensor) -> Tensor:
        """Vocabulary logits ``[B, L, V]`` with teacher forcing on ``labels`` ``[B, L]`` (decoder inputs =
        labels shifted right behind the start token, as ``T5ForConditionalGeneration(labels=...)``)."""
        dec = torch.cat([torch.full_like(labels[:, :1], self.start_id), labels[:, :-1]], dim=1)
        pad = self.module.config.pad_token_id
        dec = dec.masked_fill(dec == -100, 0 if pad is None else pad)
        with autocast_context(self.device, self.autocast):
            out = self.call(
                params,
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                decoder_input_ids=dec,
                use_cache=False,
            )
        return out.logits.float()

    # ---- fine-tuned models -------------------------------------------------------------------------
    def finetuned_id(self, task: str) -> str:
        return self.finetuned_pattern.format(task=task)

    def identify_finetuned(self, task: str) -> None:
        resolve.resolve_model_dir(self.finetuned_id(task), self.local_dir)  # records its digest

    def load_finetuned(self, task: str) -> StateDict:
        repo = self.finetuned_id(task)
        path = resolve.resolve_model_dir(repo, self.local_dir)
        if self.variant == "full":
            model = from_pretrained(self._auto, path, dtype=torch.float32)
        else:
            from peft import PeftModel

            base = from_pretrained(self._auto, self.path, dtype=torch.float32)
            model = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
        return self.validate_finetuned(task, dict(model.state_dict()), repo)

    # ---- export (save_merged) -------------------------------------------------------------------
    def save_model(self, weights: StateDict, out_dir: Any) -> dict[str, Any]:
        """The whole seq2seq model with the merged weights + its tokenizer, for
        ``AutoModelForSeq2SeqLM.from_pretrained(dir)``. ``variant: lora``: the merged weights are dense
        (the adapters were folded in when loaded), so this is a full model, not a peft adapter dir."""
        from otmf_exp.models.export import with_weights

        with_weights(self.module, weights).save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        return {
            "loader": "transformers.AutoModelForSeq2SeqLM.from_pretrained(dir) + AutoTokenizer.from_pretrained(dir)",
            "variant": self.variant,
            "lora": "folded into a full model (dense weights)" if self.variant == "lora" else None,
            "generation": {"max_new_tokens": self.max_new_tokens, "do_sample": False, "num_beams": 1},
        }
