"""Structured config schemas (Hydra ConfigStore): a typo fails at compose time.

Each method's schema is the ``Config`` dataclass in its own module (registered here from
``merging.METHODS``), so adding a method needs no edit in this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class BackboneConfig:
    name: str = MISSING
    #: tiny | hf_clip | open_clip | hf_t5 (see ``models.BACKBONES``)
    kind: str = MISSING
    #: hub id of the pre-trained model (e.g. openai/clip-vit-base-patch32)
    model_id: str | None = None
    #: hub id template of the fine-tuned models, ``{task}`` is replaced by the task's hub suffix
    finetuned: str | None = None
    #: hub id template of the LoRA adapters (``variant: lora``), e.g. tanganke/flan-t5-base_glue-{task}_lora-16
    finetuned_lora: str | None = None
    #: a local directory that replaces the hub (``<local_dir>/<id>``), for offline use
    local_dir: str | None = None
    #: full | lora (Flan-T5)
    variant: str = "full"
    #: open_clip architecture name and pretrained tag; directory of per-task state-dict files
    arch: str | None = None
    pretrained_tag: str | None = None
    checkpoint_dir: str | None = None
    #: OTMF features for text models: mean_pool (encoder states over non-pad tokens) | first_token
    features: str = "mean_pool"
    #: inputs per batch for evaluation and feature extraction, and data-loader workers
    batch_size: int = 128
    num_workers: int = 0
    #: float32 | bfloat16 | float16 autocast for forward passes on GPU (merging maths stays fp32)
    autocast: str = "float32"
    #: text-to-text models: answer length for evaluation (greedy generate) and prompt truncation
    max_new_tokens: int = 10
    max_input_length: int = 512


@dataclass
class TaskSeqConfig:
    name: str = MISSING
    #: digits | hf_vision | glue (see ``data.TASK_KINDS``)
    kind: str = MISSING
    tasks: list[str] = field(default_factory=list)
    #: a local directory replacing the hub for datasets (``<local_dir>/<dataset id>``)
    local_dir: str | None = None


@dataclass
class LoggerConfig:
    name: str = "none"
    mode: str = "disabled"
    project: str = "otmf_exp"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    dir: str | None = None


@dataclass
class RunConfig:
    backbone: BackboneConfig = MISSING
    task_seq: TaskSeqConfig = MISSING
    method: Any = MISSING
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    #: overrides the method's main coefficient (OTMF α, OPCM α, λ of TA/TIES/MagMax); null = default
    alpha: float | None = None
    seed: int = 0
    #: given | shuffled | an explicit list of task names
    task_order: Any = "given"
    order_seed: int = 0
    #: continual | joint
    protocol: str = "continual"
    save_merged: bool = False
    eval_split: str = "test"
    #: evaluate each fine-tuned model on its task (needed for normalized ACC)
    eval_individual: bool = True
    #: auto | cpu | cuda | cuda:N
    device: str = "auto"
    progress: bool = True
    #: run directory; null = Hydra's run dir (outputs/...)
    out_dir: str | None = None
    #: continue from the last completed step's checkpoint in out_dir
    resume: bool = False
    #: last | all | none
    keep_checkpoints: str = "last"
    #: use deterministic torch algorithms
    deterministic: bool = True


def register_configs() -> None:
    from otmf_exp.merging import METHODS

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="backbone", name="backbone_schema", node=BackboneConfig)
    cs.store(group="task_seq", name="task_seq_schema", node=TaskSeqConfig)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)
    for name, cls in METHODS.items():
        cs.store(group="method", name=f"{name}_schema", node=cls.Config)
