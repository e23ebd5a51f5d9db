"""Config schemas (Hydra ConfigStore) and the checks of a composed config before any heavy work.

Each method's schema is the ``Config`` dataclass in its own module (registered here from
``merging.METHODS``), so adding a method needs no edit in this file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from otmf_exp.errors import UserError
from otmf_exp.schema import SEED_MAX, SPLITS, checked_by, choice, declarations, neutral, neutral_keys, num
from otmf_exp.schema import check as check_declared


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
    variant: str = choice("full", ("full", "lora"))
    #: open_clip architecture name and pretrained tag; directory of per-task state-dict files
    arch: str | None = None
    pretrained_tag: str | None = None
    checkpoint_dir: str | None = None
    #: OTMF features for text models: mean_pool (encoder states over non-pad tokens) | first_token
    features: str = choice("mean_pool", ("mean_pool", "first_token"))
    #: inputs per batch for evaluation and feature extraction, and data-loader workers
    batch_size: int = neutral(num(128, ge=1), tables_only=True)
    num_workers: int = neutral(num(0, ge=0))
    #: float32 | bfloat16 | float16 autocast for forward passes on GPU (merging maths stays fp32)
    autocast: str = choice("float32", ("float32", "bfloat16", "float16"))
    #: text-to-text models: answer length for evaluation (greedy generate) and prompt truncation
    max_new_tokens: int = num(10, ge=1)
    max_input_length: int = num(512, ge=1)
    #: synthetic (benchmark stand-in): θ_t = θ₀ + noise · N(0, 1), seeded per task
    noise: float = num(1e-3, ge=0)


@dataclass
class TaskSeqConfig:
    name: str = MISSING
    #: digits | hf_vision | glue | synthetic (see ``data.TASK_KINDS``)
    kind: str = MISSING
    tasks: list[str] = field(default_factory=list)
    #: a local directory replacing the hub for datasets (``<local_dir>/<dataset id>``)
    local_dir: str | None = None
    #: synthetic (benchmark stand-in): examples per split, e.g. {train: 64, validation: 16, test: 64}
    split_sizes: dict[str, int] = num({}, ge=0, keys=SPLITS)


@dataclass
class LoggerConfig:
    name: str = "none"
    #: online | offline | disabled; null = $WANDB_MODE, else online
    mode: str | None = choice("disabled", ("online", "offline", "disabled"))
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
    #: the method's own ``Config`` (``merging.METHODS[name].Config``), checked by its declarations
    method: Any = checked_by(MISSING, "the method's Config")
    logger: LoggerConfig = neutral(field(default_factory=LoggerConfig))
    #: overrides the method's main coefficient (OTMF α, OPCM α, λ of TA/TIES/MagMax); null = default
    alpha: float | None = num(None, ge=0, le=1)
    seed: int = num(0, ge=0, le=SEED_MAX, integer=True)
    #: given | shuffled | an explicit list of task names
    task_order: Any = checked_by("given", "resolve_order")
    order_seed: int = num(0, ge=0, le=SEED_MAX, integer=True)
    #: continual | joint
    protocol: str = choice("continual", ("continual", "joint"))
    save_merged: bool = neutral(False)
    eval_split: str = choice("test", SPLITS)
    #: evaluate each fine-tuned model on its task (needed for normalized ACC)
    eval_individual: bool = neutral(True, tables_only=True)
    #: auto | cpu | cuda | cuda:N
    device: str = neutral("auto", tables_only=True)
    progress: bool = neutral(True)
    #: run directory; null = Hydra's run dir (outputs/...)
    out_dir: str | None = neutral(None)
    #: continue from the last completed step's checkpoint in out_dir
    resume: bool = neutral(False)
    #: last | all | none
    keep_checkpoints: str = neutral(choice("last", ("last", "all", "none")))
    #: use deterministic torch algorithms
    deterministic: bool = True
    #: torch intra-op threads: auto (the CPUs this process may use, divided by a joblib sweep's
    #: concurrent jobs; 1 for the tiny digits tower) or an integer >= 1; recorded in metrics.json
    threads: Any = neutral(num("auto", ge=1, integer=True, also=("auto",)))
    #: resume=true normally refuses a checkpoint written by another code version (git sha)
    resume_across_versions: bool = neutral(False)
    #: a -m sweep into a hydra.sweep.dir that holds results: refuse (one line, exit 2) | append (new
    #: job dirs numbered after the existing ones; the old multirun.yaml kept as multirun.N.yaml) |
    #: resume (the same jobs, each with resume=true)
    sweep_existing: str = neutral(choice("refuse", ("refuse", "append", "resume")))
    #: torch.set_float32_matmul_precision, applied once per run before any model work: highest (full
    #: float32, default) | high | medium (TF32 on CUDA; bf16 on CPUs with bf16 instructions such as
    #: AVX512-BF16; the OTMF authors' scripts/_common.py sets medium)
    matmul_precision: str = choice("highest", ("highest", "high", "medium"))


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


def _job_method(choice: str | None) -> str:
    """The method preset a sweep job composed (``hydra.runtime.choices.method``: ``adamerging_plus``,
    which ``method.name`` shares with ``adamerging``), path separators replaced: a job dir's name."""
    return re.sub(r"[/\\\s:]+", "_", str(choice or "method")).strip("_") or "method"


def register_resolvers() -> None:
    """``${stamp:}`` (a unique run-dir name), ``${run_dir:${out_dir},default}`` (``hydra.run.dir``)
    and ``${job_suffix:${hydra.job.override_dirname}}`` (sweep job dirs named by their values)."""
    OmegaConf.register_new_resolver("stamp", _stamp, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("run_dir", _run_dir, replace=True)
    OmegaConf.register_new_resolver("job_suffix", _job_suffix, replace=True)
    OmegaConf.register_new_resolver("job_method", _job_method, replace=True)


def neutral_config_keys(tables: bool = False) -> tuple[str, ...]:
    """Every config key declared ``result_neutral`` (:func:`otmf_exp.schema.neutral`): the run's
    own fields and each method's (``method.<field>``); ``tables=True`` adds the ``tables_only`` ones."""
    from otmf_exp.merging import METHODS

    keys = set(neutral_keys(RunConfig, tables=tables))
    for cls in METHODS.values():
        keys.update(neutral_keys(cls.Config, "method.", tables))
    return tuple(sorted(keys))


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore under ``schema/`` (never a choice of a user-facing
    group): a group's YAML extends its schema with ``- /schema/<group>@_here_`` and a method's with
    ``- /schema/method/<name>@_here_``, so a typo in any key fails at compose time."""
    from otmf_exp.merging import METHODS

    register_resolvers()
    for schema in (RunConfig, *(cls.Config for cls in METHODS.values())):
        declarations(schema)  # a numeric field without a declared range is refused here
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
                "METHODS in src/otmf_exp/merging/__init__.py (docs/extending.md)"
            )
    for name, cls in METHODS.items():
        if name != cls.name:
            raise UserError(f"METHODS[{name!r}] is {cls.__name__}, whose name is {cls.name!r}: use one name")
        if name not in yamls:
            raise UserError(
                f"method {name!r} is registered but has no conf/method/{name}.yaml: add one with "
                f"`defaults: [/schema/method/{name}@_here_, _self_]` (docs/extending.md)"
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
    """The method's config with the top-level ``alpha`` applied to its main coefficient, checked."""
    from otmf_exp.merging import METHODS

    name = cfg.method.name
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    cls = METHODS[name]
    check_values(cfg)
    mcfg = OmegaConf.create(OmegaConf.to_container(cfg.method, resolve=True))
    OmegaConf.set_struct(mcfg, True)
    if cfg.alpha is not None:
        a = float(cfg.alpha)
        if cls.main_coef is None:
            raise UserError(f"method {name!r} has no coefficient for alpha to set; remove alpha={a}")
        with open_dict(mcfg):
            mcfg[cls.main_coef] = a
    validate_method(cls, mcfg)
    return mcfg


def validate_method(cls: Any, cfg: Any) -> None:
    """A method's config (DictConfig, dict or ``cls.Config`` instance): every value against the
    declarations of ``cls.Config`` (errors name ``method.<key>``), then ``cls.validate``, the rules
    across fields. One :class:`UserError` line."""
    if isinstance(cfg, DictConfig):
        plain = OmegaConf.to_container(cfg, resolve=True)
    elif dataclasses.is_dataclass(cfg):
        plain = dataclasses.asdict(cfg)
    else:
        plain = dict(cfg)
    check_declared(cls.Config, plain, "method.")
    cls.validate(cfg)


def check_run_config(cfg: DictConfig) -> None:
    """Every check of a composed config that needs no model or data: every declared value
    (:func:`check_values`), protocol support and the device. One :class:`UserError` line."""
    from otmf_exp.merging import METHODS
    from otmf_exp.runtime.session import check_device

    check_values(cfg)
    cls = METHODS.get(cfg.method.name)
    if cls is not None and cfg.protocol not in cls.protocols:
        raise UserError(
            f"method {cfg.method.name!r} supports protocol {list(cls.protocols)}, not {cfg.protocol!r}"
        )
    check_device(str(cfg.device))


# ---- the values, by the schemas' declarations (otmf_exp.schema) ----------------------------------
def check_values(cfg: DictConfig) -> None:
    """Enforce every declared range and choice (``otmf_exp.schema``) on the composed config: the
    top level, ``backbone``, ``task_seq``, ``logger`` and the method's ``Config`` at any depth. The
    first offence is one :class:`UserError` line naming the dotted key, the value and the range."""
    from otmf_exp.merging import METHODS

    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        raise UserError(f"the config does not resolve: {str(e).splitlines()[0]}") from None
    check_declared(RunConfig, plain)
    method = plain.get("method")
    cls = METHODS.get(method.get("name")) if isinstance(method, dict) else None
    if cls is not None:
        check_declared(cls.Config, method, "method.")


# ---- cross-field rules: degenerate settings refused before any model or data is loaded ------------
def check_cross_fields(cfg: DictConfig, order: list[str]) -> None:
    """Rules no single field's range can say (one :class:`UserError` line): consensus ``k`` against
    the number of task masks it counts, ``continual_finetune`` training on the evaluated split, an
    offload directory that is not a directory."""
    m, n = cfg.method, len(order)
    if m.name == "consensus":
        masks = n if cfg.protocol == "joint" else min(n, 2)  # continual: m_old + m_t at each step
        if int(m.k) == 0:
            raise UserError(
                "method.k=0 keeps every entry (no consensus mask: plain task arithmetic); use "
                "method=task_arithmetic, or k >= 1"
            )
        if int(m.k) > masks:
            raise UserError(
                f"method.k={m.k} exceeds the {masks} task masks a consensus counts here ({cfg.protocol}, "
                f"{n} tasks), so it keeps no entry and merges nothing; use k <= {masks}"
            )
    if (
        m.name == "continual_finetune"
        and str(m.split) == str(cfg.eval_split)
        and not m.get("train_on_eval_split")
    ):
        raise UserError(
            f"method.split={m.split} trains on the split that is evaluated (eval_split={cfg.eval_split}): "
            "the accuracies would be on training data; use method.split=train, or pass "
            "method.train_on_eval_split=true to do it on purpose (recorded)"
        )
    where = m.get("offload_dir") if "offload_dir" in m else None
    if where and not Path(str(where)).is_dir():
        what = "is a file" if Path(str(where)).exists() else "does not exist"
        raise UserError(f"method.offload_dir={where} {what}; give an existing directory (or null: $TMPDIR)")
