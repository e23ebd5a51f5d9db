"""Reference-side runner: ``python -m otmf_exp.parity.reference.run ZOO WORK NAME=module:function ...``.

Run by the parity driver in the FusionBench venv (``PYTHONPATH=src``). For every case it calls
``function(ZOO, WORK/NAME)`` and writes ``WORK/NAME/theirs.safetensors``, or ``WORK/NAME/theirs.error``
(the exception, one case failing does not stop the others); ``WORK/provenance.json`` records the
versions of the reference packages.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import subprocess
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

import torch

from otmf_exp.parity.reference.zoo import save

PACKAGES = ("fusion-bench", "torch", "transformers", "safetensors")
log = logging.getLogger(__name__)


def versions() -> dict[str, str | None]:
    """The installed versions of the reference side's packages (None when absent)."""
    out: dict[str, str | None] = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    for env in ("OTMF_REPO", "MINGLE_REPO"):  # parity-authors: the clones, by commit (never by path)
        if os.environ.get(env):
            git = subprocess.run(
                ["git", "-C", os.environ[env], "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                check=False,
            )
            out[env] = git.stdout.strip() if git.returncode == 0 else "a copy without git history"
    return out


def run_case(zoo: Path, work: Path, target: str) -> float:
    """Call ``target`` (``module:function``) on (zoo, work) and save what it returns; seconds taken."""
    module, _, func = target.partition(":")
    fn = getattr(importlib.import_module(module), func)
    work.mkdir(parents=True, exist_ok=True)
    (work / "theirs.error").unlink(missing_ok=True)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the references' prints stay out of the table
        tensors = fn(zoo, work)
    save(tensors, work / "theirs.safetensors")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print("usage: python -m otmf_exp.parity.reference.run ZOO WORK NAME=module:function ...")
        return 2
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    zoo, work = Path(args[0]), Path(args[1])
    work.mkdir(parents=True, exist_ok=True)
    (work / "provenance.json").write_text(json.dumps(versions(), indent=1))
    for spec in args[2:]:
        name, _, target = spec.partition("=")
        case_dir = work / name
        try:
            seconds = run_case(zoo, case_dir, target)
            print(f"reference {name}: {seconds:.1f} s", flush=True)
        except Exception:  # recorded for the driver: the row fails with this message
            case_dir.mkdir(parents=True, exist_ok=True)
            (case_dir / "theirs.safetensors").unlink(missing_ok=True)
            (case_dir / "theirs.error").write_text(traceback.format_exc())
            print(f"reference {name}: failed (see {case_dir / 'theirs.error'})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
