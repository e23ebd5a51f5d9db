"""GLUE as text-to-text for Flan-T5 (``task_seq.kind: glue``; Wang et al. 2019, GLUE).

Prompts and label words are FusionBench's (Tang et al. 2024), which its Flan-T5 fine-tunes were
trained on -- kept verbatim, spelling included ("Answere"), since the models expect exactly them.
Data: the ``glue`` configs (hub id ``nyu-mll/glue``, where ``glue`` redirects), evaluated on
``validation`` (``validation_matched`` for mnli); ``train`` / ``validation`` of the methods are a
90% / 10% cut (seed 0) of GLUE's train split.

Metrics: exact match (%) of the generated text with the label text; ``stsb``: Spearman ρ × 100 of
the parsed numbers, with unparsable answers read as 0.0 (a constant answer gives ρ = 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from otmf_exp.data.hf_loading import HubSplitsTaskData, split_view
from otmf_exp.errors import UserError
from otmf_exp.hub import resolve

GLUE_DATASET = "nyu-mll/glue"
GLUE8 = ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb"]


@dataclass(frozen=True)
class GluePrompt:
    """``template`` formatted with the example's ``fields``; ``answers[label]`` or ``{:.1f}`` (stsb)."""

    template: str
    fields: tuple[str, ...]
    answers: tuple[str, ...] | None  # None: regression, answer = f"{label:.1f}"
    test_split: str = "validation"

    @property
    def metric(self) -> str:
        return "spearman" if self.answers is None else "exact_match"


_YN = ("yes", "no")
_NY = ("no", "yes")
PROMPTS: dict[str, GluePrompt] = {
    "cola": GluePrompt(
        'Indicate if the following sentence is grammatically correct or not: "{sentence}". '
        "Answere 'acceptable' or 'unacceptable'.",
        ("sentence",),
        ("unacceptable", "acceptable"),
    ),
    "mnli": GluePrompt(
        "Does the premise: '{premise}' logically imply, contradict, or is neutral to the hypothesis: "
        "'{hypothesis}'? Answere with 'entailment', 'contradiction', or 'neutral'.",
        ("premise", "hypothesis"),
        ("entailment", "neutral", "contradiction"),
        test_split="validation_matched",
    ),
    "mrpc": GluePrompt(
        "Are the following sentences '{sentence1}' and '{sentence2}' conveying the same meaning? "
        "Answere with 'yes' or 'no'.",
        ("sentence1", "sentence2"),
        _NY,
    ),
    "qnli": GluePrompt(
        "Given the context: '{sentence}', does the question '{question}' have an answer based on the "
        "information provided? Answer with 'yes' or 'no'.",
        ("sentence", "question"),
        _YN,
    ),
    "qqp": GluePrompt(
        "Do the questions '{question1}' and '{question2}' have the same intent? Answere with 'yes' or 'no'.",
        ("question1", "question2"),
        _NY,
    ),
    "rte": GluePrompt(
        "Does the text: '{sentence1}' entail that '{sentence2}' is true? Provide 'yes' or 'no'.",
        ("sentence1", "sentence2"),
        _YN,
    ),
    "sst2": GluePrompt(
        "Given the sentence '{sentence}', determine the sentiment. Is it positive or negative?",
        ("sentence",),
        ("negative", "positive"),
    ),
    "stsb": GluePrompt(
        "Consider the sentences '{sentence1}' and '{sentence2}'. On a scale from 1 (completely different) "
        "to 5 (completely similar), rate the similarity.",
        ("sentence1", "sentence2"),
        None,
    ),
}


def render(task: str, example: dict[str, Any]) -> tuple[str, str]:
    """(prompt, answer text) of one GLUE example."""
    p = PROMPTS[task]
    text = p.template.format(**{f: example[f] for f in p.fields})
    label = example["label"]
    answer = (
        f"{float(label):.1f}"
        if p.answers is None
        else (p.answers[int(label)] if 0 <= int(label) < len(p.answers) else "")
    )
    return text, answer


# ---- metrics ----------------------------------------------------------------------------------
def parse_float(s: str) -> float:
    try:
        v = float(s.strip())
    except (ValueError, AttributeError):
        return 0.0
    return v if math.isfinite(v) else 0.0


def exact_match(preds: list[str], targets: list[str]) -> float:
    """% of predictions equal to their target (surrounding whitespace ignored)."""
    return 100.0 * sum(p.strip() == t.strip() for p, t in zip(preds, targets, strict=True)) / len(targets)


def spearman(preds: list[str], targets: list[str]) -> float:
    """Spearman ρ × 100 of parsed numbers (unparsable -> 0.0; undefined ρ, e.g. constant answers -> 0)."""
    from scipy.stats import spearmanr

    x = [parse_float(p) for p in preds]
    y = [parse_float(t) for t in targets]
    if len(set(x)) < 2 or len(set(y)) < 2:
        return 0.0
    rho = float(spearmanr(x, y)[0])
    return 100.0 * rho if math.isfinite(rho) else 0.0


def score(preds: list[str], targets: list[str], metric: str) -> float:
    if metric == "spearman":
        return spearman(preds, targets)
    if metric == "exact_match":
        return exact_match(preds, targets)
    raise ValueError(f"unknown text metric {metric!r}")


# ---- task data ----------------------------------------------------------------------------------
class Tokenize:
    """``Dataset.map`` function (batched): prompts -> token ids, answer texts -> ``target``."""

    def __init__(self, task: str, tokenizer: Any, max_length: int) -> None:
        self.task, self.tokenizer, self.max_length = task, tokenizer, max_length

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        rows = [dict(zip(batch, vals)) for vals in zip(*batch.values())]
        pairs = [render(self.task, r) for r in rows]
        enc = self.tokenizer([p for p, _ in pairs], truncation=True, max_length=self.max_length)
        return {"input_ids": enc["input_ids"], "target": [a for _, a in pairs], "label": batch["label"]}


class TextCollate:
    def __init__(self, pad_id: int, regression: bool) -> None:
        self.pad_id, self.regression = pad_id, regression

    def __call__(self, batch: dict[str, list]) -> dict[str, Any]:
        ids = [torch.as_tensor(x, dtype=torch.long) for x in batch["input_ids"]]
        n = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), n), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = x
            mask[i, : len(x)] = 1
        labels = torch.tensor(batch["label"], dtype=torch.float32 if self.regression else torch.long)
        return {
            "inputs": {"input_ids": input_ids, "attention_mask": mask},
            "labels": labels,
            "targets": list(batch["target"]),
        }


class GlueTaskData(HubSplitsTaskData):
    """One GLUE task, tokenized once per split (``Dataset.map``, cached by ``datasets``)."""

    classnames = None

    def __init__(
        self,
        name: str,
        tokenizer: Any,
        local_dir: str | None,
        max_length: int = 512,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.name = name
        self.prompt = PROMPTS[name]
        self.metric = self.prompt.metric
        self.tokenizer = tokenizer
        self.local_dir = local_dir
        self.max_length = max_length
        self.num_workers, self.pin_memory = num_workers, pin_memory
        pad = tokenizer.pad_token_id
        self._collate = TextCollate(0 if pad is None else int(pad), self.prompt.answers is None)
        self._hub: dict[str, Any] = {}
        self._splits: dict[str, Any] = {}

    def _load_hub(self, hub_split: str) -> Any:
        if hub_split not in self._hub:
            ds = resolve.load_split(GLUE_DATASET, self.name, hub_split, self.local_dir)
            missing = [c for c in (*self.prompt.fields, "label") if c not in ds.column_names]
            if missing:
                raise UserError(
                    f"GLUE task {self.name!r}: dataset has no column {missing[0]!r} ({ds.column_names})"
                )
            self._hub[hub_split] = ds
        return self._hub[hub_split]

    def _get(self, split: str) -> Any:
        if split not in self._splits:
            ds = split_view(self._load_hub, split, self.prompt.test_split, "train")
            keep = [*self.prompt.fields, "label"]
            ds = ds.select_columns(keep).map(
                Tokenize(self.name, self.tokenizer, self.max_length),
                batched=True,
                remove_columns=keep,
                desc=f"tokenize {self.name}/{split}",
            )
            self._splits[split] = ds
        return self._splits[split]


def build_glue_task(task: str, seq_cfg: Any, backbone: Any) -> GlueTaskData:
    """``TASK_KINDS['glue']``: the task tokenized with ``backbone.tokenizer``."""
    if task not in PROMPTS:
        raise UserError(f"unknown GLUE task {task!r}; known: {sorted(PROMPTS)}")
    if getattr(backbone, "modality", None) != "text" or getattr(backbone, "tokenizer", None) is None:
        raise UserError(
            f"task_seq {seq_cfg.name!r} is a text benchmark; use a text backbone (backbone=flan_t5_base)"
        )
    device = getattr(backbone, "device", torch.device("cpu"))
    return GlueTaskData(
        task,
        backbone.tokenizer,
        seq_cfg.get("local_dir"),
        max_length=int(getattr(backbone, "max_input_length", 512)),
        num_workers=int(getattr(backbone, "num_workers", 0)),
        pin_memory=device.type == "cuda",
    )
