"""The reference side of ``make parity-authors``: code that is not a package, read from a clone.

``MINGLE_REPO`` (a clone of GitHub zihuanqiu/MINGLE) holds ``fusion_bench/method/mingle/consensus_ta.py``;
its ``ContinualConsensusTAForCLIP`` imports only what FusionBench 0.2.33 also has, so the file is loaded
by its path (its imports resolve against the installed ``fusion_bench``, not MINGLE's fork) and its
``run()`` is called unchanged on the zoo's towers, the merged tower captured after every step.
"""

from __future__ import annotations

import importlib.util
import os
import types
from pathlib import Path

import torch

from otmf_exp.parity.reference.zoo import Zoo, continual_steps

CONSENSUS = "fusion_bench/method/mingle/consensus_ta.py"


def by_path(env: str, rel: str) -> types.ModuleType:
    """The module at ``$env/rel`` (the clone the driver passes), imported by its path."""
    root = os.environ.get(env)
    if not root:
        raise RuntimeError(f"{env} is not set (make parity-authors sets it from {env}=DIR)")
    path = Path(root) / rel
    if not path.is_file():
        raise RuntimeError(f"{env} has no {rel}: is it a clone of the right repository?")
    spec = importlib.util.spec_from_file_location(f"_authors_{path.stem}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _consensus(zoo: Zoo, scaling: float = 0.1, lmda: float = 0.2, k: int = 2) -> dict[str, torch.Tensor]:
    mingle = by_path("MINGLE_REPO", CONSENSUS)
    return continual_steps(mingle.ContinualConsensusTAForCLIP, zoo, scaling_factor=scaling, lmda=lmda, k=k)


def consensus_continual(zoo_dir: Path, work_dir: Path) -> dict[str, torch.Tensor]:
    return _consensus(Zoo(zoo_dir))


def consensus_continual_f64(zoo_dir: Path, work_dir: Path) -> dict[str, torch.Tensor]:
    return _consensus(Zoo(zoo_dir, torch.float64))
