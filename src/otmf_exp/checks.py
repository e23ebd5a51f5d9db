"""Generic checks of a composed config, by rule rather than per method: the rules by field name
(:func:`value_problem`: finite floats, split names, seeds, counts, learning rates, one sign
convention for coefficients) applied to every leaf of the config, and the device string.

Used by ``config.check_run_config`` before any heavy work; each method's ``validate`` adds only
what is specific to it (choices, ranges such as a density in (0, 1]).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from otmf_exp.data.base import SPLITS  # the split names every task-data loader knows
from otmf_exp.errors import UserError

#: seeds: numpy's range (torch accepts it too; the per-step seed ``seed·1000 + step`` stays in range)
SEED_MAX = 2**32 - 1
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device(name: str) -> None:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps``, and available on this machine."""
    if not _DEVICE.match(name):
        raise UserError(f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    if name.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"device={name} but CUDA is not available; use device=cpu or device=auto")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UserError(
                f"device={name} but this machine has {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
    if name == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise UserError("device=mps but MPS is not available; use device=cpu or device=auto")


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
    """What is wrong with leaf ``name`` = ``value`` under the rules by name, or None.

    * every float is finite (no NaN / inf anywhere);
    * ``*split`` is a split name (train | validation | test);
    * ``seed`` / ``*_seed``: an integer in [0, 2^32 − 1];
    * ``*batch_size``: ≥ 1; ``*workers``: ≥ 0; ``steps`` / ``iterations`` / ``epochs`` and
      ``*_steps`` / ``*_iterations`` / ``*_epochs`` / ``*_batches``: ≥ 0; ``max_*`` (int): ≥ 1;
    * ``lr`` / ``*_lr``: > 0;
    * scaling coefficients, ``scaling`` / ``*_scaling`` / ``alpha``: ≥ 0 (one sign convention for
      every method: a negative coefficient is never a valid merge).
    """
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


_COUNTS = ("steps", "iterations", "epochs")
_COUNT_SUFFIXES = ("_steps", "_iterations", "_epochs", "_batches")


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
