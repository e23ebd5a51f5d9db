"""Checks that run before any heavy work: one clear :class:`UserError` per bad input."""

from __future__ import annotations

import os
import random
import uuid
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from otmf_exp.errors import UserError
from otmf_exp.merging import METHODS


def resolve_order(cfg: DictConfig) -> list[str]:
    """The task order: ``given``, ``shuffled`` (by ``order_seed``) or an explicit list."""
    tasks = list(cfg.task_seq.tasks)
    if not tasks:
        raise UserError(f"task_seq {cfg.task_seq.name!r} has no tasks; list at least one under task_seq.tasks")
    if len(set(tasks)) != len(tasks):
        raise UserError(f"task_seq {cfg.task_seq.name!r} repeats a task: {tasks}")
    order = cfg.task_order
    if isinstance(order, (list, ListConfig)):
        order = [str(t) for t in order]
        if not order:
            raise UserError("task_order is an empty list; give at least one task name")
        unknown = [t for t in order if t not in tasks]
        if unknown:
            raise UserError(f"task_order names unknown task {unknown[0]!r}; tasks of {cfg.task_seq.name}: {tasks}")
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
    if hasattr(cls, "validate"):
        cls.validate(mcfg)
    return mcfg


def check_run_config(cfg: DictConfig) -> None:
    if cfg.protocol not in ("continual", "joint"):
        raise UserError(f"protocol must be 'continual' or 'joint', got {cfg.protocol!r}")
    cls = METHODS.get(cfg.method.name)
    if cls is not None and cfg.protocol not in cls.protocols:
        raise UserError(f"method {cfg.method.name!r} supports protocol {list(cls.protocols)}, not {cfg.protocol!r}")
    if cfg.keep_checkpoints not in ("last", "all", "none"):
        raise UserError(f"keep_checkpoints must be last, all or none, got {cfg.keep_checkpoints!r}")
    if cfg.backbone.batch_size < 1:
        raise UserError(f"backbone.batch_size must be >= 1, got {cfg.backbone.batch_size}")


def check_writable(out_dir: Path) -> None:
    """Create ``out_dir`` and prove a file can be written there."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write_probe_{uuid.uuid4().hex}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output directory {out_dir} is not writable ({e.strerror}); set out_dir= or hydra.run.dir=") from None
    if not os.access(out_dir, os.W_OK):
        raise UserError(f"output directory {out_dir} is not writable; set out_dir= or hydra.run.dir=")
