"""Config schemas (Hydra ConfigStore) and the checks of a composed config before any heavy work.

Each method's schema is the ``Config`` dataclass in its own module (registered here from
``merging.METHODS``), so adding a method needs no edit in this file.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from otmf_exp.errors import UserError


@dataclass
class BackboneConfig:
    name: str = MISSING
    #: tiny | hf_clip | open_clip | hf_t5 | synthetic (see ``models.BACKBONES``)
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
    #: synthetic (benchmark stand-in): θ_t = θ₀ + noise · N(0, 1), seeded per task
    noise: float = 1e-3


@dataclass
class TaskSeqConfig:
    name: str = MISSING
    #: digits | hf_vision | glue | synthetic (see ``data.TASK_KINDS``)
    kind: str = MISSING
    tasks: list[str] = field(default_factory=list)
    #: a local directory replacing the hub for datasets (``<local_dir>/<dataset id>``)
    local_dir: str | None = None
    #: synthetic (benchmark stand-in): examples per split, e.g. {train: 64, validation: 16, test: 64}
    split_sizes: dict[str, int] = field(default_factory=dict)


@dataclass
class LoggerConfig:
    name: str = "none"
    #: online | offline | disabled; null = $WANDB_MODE, else online
    mode: str | None = "disabled"
    #: null = $WANDB_PROJECT, else otmf_exp
    project: str | None = None
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
    #: torch intra-op threads: auto (the CPUs this process may use, divided by a joblib sweep's
    #: concurrent jobs; 1 for the tiny digits tower) or an integer >= 1; recorded in metrics.json
    threads: Any = "auto"
    #: resume=true normally refuses a checkpoint written by another code version (git sha)
    resume_across_versions: bool = False
    #: torch.set_float32_matmul_precision, applied once per run before any model work: highest (full
    #: float32, default) | high | medium (TF32 on CUDA; bf16 on CPUs with bf16 instructions such as
    #: AVX512-BF16; the OTMF authors' scripts/_common.py sets medium)
    matmul_precision: str = "highest"


def _stamp() -> str:
    """A run's directory name: time to the second plus 6 random hex digits (unique even for runs
    started in the same second; cached per config, so one run resolves it once)."""
    import uuid
    from datetime import datetime

    return f"{datetime.now():%Y-%m-%d_%H-%M-%S}_{uuid.uuid4().hex[:6]}"


def _run_dir(out_dir: str | None, default: str) -> str:
    # out_dir given: Hydra stays in the current directory, where it writes nothing (no .hydra/, no
    # log file: conf/run.yaml), so the run writes only into out_dir; else the unique default dir
    return "." if out_dir not in (None, "") else default


def _job_suffix(override_dirname: str) -> str:
    """``_alpha=0.7,method.iterations=10`` from Hydra's ``override_dirname`` (a sweep job's dir name
    after its number and method): path separators and spaces replaced, at most 120 characters."""
    s = re.sub(r"[/\\\s:]+", "_", str(override_dirname or "")).strip("_")
    if len(s) > 120:
        s = s[:111] + "~" + hashlib.sha1(s.encode()).hexdigest()[:8]
    return f"_{s}" if s else ""


def register_resolvers() -> None:
    """``${stamp:}`` (a unique run-dir name), ``${run_dir:${out_dir},default}`` (``hydra.run.dir``)
    and ``${job_suffix:${hydra.job.override_dirname}}`` (sweep job dirs named by their values)."""
    OmegaConf.register_new_resolver("stamp", _stamp, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("run_dir", _run_dir, replace=True)
    OmegaConf.register_new_resolver("job_suffix", _job_suffix, replace=True)


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore under ``schema/`` (never a choice of a user-facing
    group): a group's YAML extends its schema with ``- /schema/<group>@_here_`` and a method's with
    ``- /schema/method/<name>@_here_``, so a typo in any key fails at compose time."""
    from otmf_exp.merging import METHODS

    register_resolvers()
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="schema", name="backbone", node=BackboneConfig)
    cs.store(group="schema", name="task_seq", node=TaskSeqConfig)
    cs.store(group="schema", name="logger", node=LoggerConfig)
    for name, cls in METHODS.items():
        cs.store(group="schema/method", name=name, node=cls.Config)


def method_yamls() -> list[str]:
    """Names of the method YAMLs shipped in ``conf/method/``."""
    from importlib import resources

    folder = resources.files("otmf_exp.conf") / "method"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def method_of_yaml(name: str) -> str:
    """The method a ``conf/method/<name>.yaml`` configures: the ``<m>`` of its
    ``/schema/method/<m>@_here_`` default (a *preset* when ``m != name``); ``name`` itself when the
    file is absent or extends no method schema."""
    from importlib import resources

    path = resources.files("otmf_exp.conf") / "method" / f"{name}.yaml"
    if not path.is_file():
        return name
    defaults = OmegaConf.create(path.read_text()).get("defaults") or []
    for d in defaults:
        if isinstance(d, str) and d.startswith("/schema/method/") and d.endswith("@_here_"):
            return d[len("/schema/method/") : -len("@_here_")]
    return name


def method_presets() -> dict[str, str]:
    """``{preset YAML name: method}`` of the method YAMLs that set another method's constants
    (e.g. ``c_adamerging`` -> ``adamerging``)."""
    return {n: m for n in method_yamls() if (m := method_of_yaml(n)) != n}


def check_registry() -> None:
    """Every method YAML configures a registered class (its own, or a preset of another's) and
    every registered class has its own YAML (one clear line)."""
    from otmf_exp.merging import METHODS

    yamls = method_yamls()
    for name in yamls:
        method = method_of_yaml(name)
        if method not in METHODS:
            raise UserError(
                f'conf/method/{name}.yaml has no registered method: add `"{method}": <YourClass>` to '
                'METHODS in src/otmf_exp/merging/__init__.py (README "Extending")'
            )
    for name, cls in METHODS.items():
        if name != cls.name:
            raise UserError(f"METHODS[{name!r}] is {cls.__name__}, whose name is {cls.name!r}: use one name")
        if name not in yamls:
            raise UserError(
                f"method {name!r} is registered but has no conf/method/{name}.yaml: add one with "
                f'`defaults: [/schema/method/{name}@_here_, _self_]` (README "Extending")'
            )


# ---- checks of a composed config (run before any heavy work) ------------------------------------
def resolve_order(cfg: DictConfig) -> list[str]:
    """The task order: ``given``, ``shuffled`` (by ``order_seed``) or an explicit list."""
    tasks = list(cfg.task_seq.tasks)
    if not tasks:
        raise UserError(
            f"task_seq {cfg.task_seq.name!r} has no tasks; list at least one under task_seq.tasks"
        )
    if len(set(tasks)) != len(tasks):
        raise UserError(f"task_seq {cfg.task_seq.name!r} repeats a task: {tasks}")
    order = cfg.task_order
    if isinstance(order, (list, ListConfig)):
        order = [str(t) for t in order]
        if not order:
            raise UserError("task_order is an empty list; give at least one task name")
        unknown = [t for t in order if t not in tasks]
        if unknown:
            raise UserError(
                f"task_order names unknown task {unknown[0]!r}; tasks of {cfg.task_seq.name}: {tasks}"
            )
        if len(set(order)) != len(order):
            dup = next(t for t in order if order.count(t) > 1)
            raise UserError(f"task_order repeats task {dup!r}; name each task at most once")
        return order
    if order == "given":
        return tasks
    if order == "shuffled":
        rng = random.Random(int(cfg.order_seed))
        shuffled = list(tasks)
        rng.shuffle(shuffled)
        return shuffled
    raise UserError(f"task_order must be 'given', 'shuffled' or a list of task names, got {order!r}")


def method_config(cfg: DictConfig) -> Any:
    from otmf_exp.merging import METHODS

    """The method's config with the top-level ``alpha`` applied to its main coefficient."""
    name = cfg.method.name
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    cls = METHODS[name]
    mcfg = OmegaConf.create(OmegaConf.to_container(cfg.method, resolve=True))
    OmegaConf.set_struct(mcfg, True)
    if cfg.alpha is not None:
        a = float(cfg.alpha)
        if not 0.0 <= a <= 1.0:
            raise UserError(f"alpha must be in [0, 1], got {a}")
        if cls.main_coef is None:
            raise UserError(f"method {name!r} has no coefficient for alpha to set; remove alpha={a}")
        with open_dict(mcfg):
            mcfg[cls.main_coef] = a
    cls.validate(mcfg)
    return mcfg


def check_run_config(cfg: DictConfig) -> None:
    """Every check of a composed config that needs no model or data: the generic value rules
    (:func:`check_values`), the top-level choices and the device. One :class:`UserError` line."""
    from otmf_exp.merging import METHODS
    from otmf_exp.runtime.session import check_device

    check_values(cfg)
    if cfg.protocol not in ("continual", "joint"):
        raise UserError(f"protocol must be 'continual' or 'joint', got {cfg.protocol!r}")
    cls = METHODS.get(cfg.method.name)
    if cls is not None and cfg.protocol not in cls.protocols:
        raise UserError(
            f"method {cfg.method.name!r} supports protocol {list(cls.protocols)}, not {cfg.protocol!r}"
        )
    if cfg.keep_checkpoints not in ("last", "all", "none"):
        raise UserError(f"keep_checkpoints must be last, all or none, got {cfg.keep_checkpoints!r}")
    for key, allowed in _CHOICES.items():
        v = OmegaConf.select(cfg, key)
        if v not in allowed:
            raise UserError(f"{key} must be one of {[a for a in allowed if a is not None]}, got {v!r}")
    check_device(str(cfg.device))
    threads = cfg.get("threads", "auto")
    if threads != "auto" and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise UserError(f"threads must be auto or an integer >= 1, got {threads!r}")


#: top-level / group choices not covered by a method's ``validate`` (None = "not set")
_CHOICES = {
    "backbone.autocast": ("float32", "bfloat16", "float16"),
    "backbone.features": ("mean_pool", "first_token"),
    "backbone.variant": ("full", "lora"),
    "logger.mode": ("online", "offline", "disabled", None),
    "matmul_precision": ("highest", "high", "medium"),
}


# ---- the value rules, by field name (one walk over the composed config) ---------------------------
#: split names every task-data loader knows (``data.base.SPLITS``)
SPLITS = ("train", "validation", "test")
#: seeds: numpy's range (torch accepts it too; the per-step seed ``seed·1000 + step`` stays in range)
SEED_MAX = 2**32 - 1
_COUNTS = ("steps", "iterations", "epochs")
_COUNT_SUFFIXES = ("_steps", "_iterations", "_epochs", "_batches")


def _leaves(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted path, value)`` of every leaf of a plain container (lists index as ``key[i]``)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, node


def value_problem(name: str, value: Any) -> str | None:
    """What is wrong with leaf ``name`` = ``value`` under the rules by name (README
    "Configuration": finite floats, ``*split``, ``*_seed``, counts, ``*_lr``, coefficients ≥ 0), or None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if name.endswith("split"):
        return None if value in SPLITS else f"must be one of {list(SPLITS)}, got {value!r}"
    if not isinstance(value, (int, float)):
        return None
    if name == "seed" or name.endswith("_seed"):
        ok = isinstance(value, int) and 0 <= value <= SEED_MAX
        return None if ok else f"must be an integer in [0, {SEED_MAX}], got {value}"
    if name.endswith("batch_size"):
        return None if value >= 1 else f"must be >= 1, got {value}"
    if name.endswith("workers") or name in _COUNTS or name.endswith(_COUNT_SUFFIXES):
        return None if value >= 0 else f"must be >= 0, got {value}"
    if name.startswith("max_") and isinstance(value, int):
        return None if value >= 1 else f"must be >= 1, got {value}"
    if name == "lr" or name.endswith("_lr"):
        return None if value > 0 else f"must be > 0, got {value}"
    if name in ("scaling", "alpha") or name.endswith("_scaling"):
        return None if value >= 0 else f"must be >= 0 (coefficients are never negative), got {value}"
    return None


def check_values(cfg: DictConfig) -> None:
    """One walk over the whole composed config (top level, ``backbone``, ``task_seq``, ``logger``,
    ``method.*`` at any depth): the first leaf breaking a rule of :func:`value_problem` is a UserError
    naming its dotted key. Rules go by field name, so a new method's fields are covered as soon
    as they follow the naming (``*_batch_size``, ``*_split``, ``*_seed``, ...)."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise UserError(f"the config does not resolve: {str(e).splitlines()[0]}") from None
    for path, value in _leaves(plain):
        problem = value_problem(path.rsplit(".", 1)[-1], value)
        if problem:
            raise UserError(f"{path} {problem}")
    sizes = plain.get("task_seq", {}).get("split_sizes") or {}
    for split, n in sizes.items():
        if split not in SPLITS:
            raise UserError(f"task_seq.split_sizes.{split}: not a split name; use {list(SPLITS)}")
        if not isinstance(n, int) or n < 0:
            raise UserError(f"task_seq.split_sizes.{split} must be >= 0, got {n}")
