"""The offline suite's model zoo: build once, cache, reuse, export.

``python -m otmf_exp.offline.zoo build``  builds (or verifies) the cache;
``python -m otmf_exp.offline.zoo export DIR`` writes ``pretrained.safetensors``, one ``<task>.safetensors``
per task (vision-tower state dicts), ``heads.safetensors`` and ``config.json`` (the module config
and recipe) so other merging tools can run on exactly the same models.

The cache lives in ``$OTMF_EXP_CACHE`` (default ``~/.cache/otmf_exp``) under a directory named
by the hash of the recipe: changing any recipe number builds a new zoo.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from otmf_exp.data import digits
from otmf_exp.errors import EXIT_USER_ERROR, UserError
from otmf_exp.offline import tiny_clip as tiny
from otmf_exp.runtime.files import atomic_dir

log = logging.getLogger(__name__)


def cache_root() -> Path:
    return Path(os.environ.get("OTMF_EXP_CACHE", Path.home() / ".cache" / "otmf_exp"))


class DigitsZoo:
    """The pre-trained tiny tower, 8 fine-tuned towers and zero-shot heads, cached on disk."""

    def __init__(
        self, recipe: tiny.TinyRecipe | None = None, root: Path | None = None, progress: bool = True
    ):
        self.recipe = recipe or tiny.TinyRecipe()
        key = json.dumps({"recipe": self.recipe.as_dict(), "tasks": digits.DIGITS8}, sort_keys=True)
        self.hash = hashlib.sha256(key.encode()).hexdigest()[:12]
        self.dir = (root or cache_root()) / f"digits8-{self.hash}"
        self.progress = progress
        self._pre = None
        self._heads = None

    def is_built(self) -> bool:
        return (self.dir / "DONE").exists()

    def build(self) -> Path:
        """Build deterministically into the cache (atomic: a half-built zoo is never visible)."""
        if self.is_built():
            return self.dir
        from rich.progress import Progress

        log.info("building the offline digits8 zoo into %s (once)", self.dir)
        torch.manual_seed(self.recipe.seed)
        with atomic_dir(self.dir) as tmp, Progress(disable=not self.progress, transient=True) as bar:
            job = bar.add_task("build digits8 zoo", total=1 + len(digits.DIGITS8))
            x, y = digits.pretraining_data()
            model = tiny.pretrain(self.recipe, x, y)
            pre = {k: v.contiguous() for k, v in model.state_dict().items()}
            save_file(pre, str(tmp / "pretrained.safetensors"))
            bar.advance(job)
            heads = {}
            for i, task in enumerate(digits.DIGITS8):
                data = digits.build_task(task)
                heads[task] = tiny.prototype_head(model, data, self.recipe).contiguous()
                ft = tiny.finetune(pre, self.recipe, data, heads[task], seed=self.recipe.seed + 1 + i)
                save_file(ft, str(tmp / f"{task}.safetensors"))
                bar.advance(job)
            save_file(heads, str(tmp / "heads.safetensors"))
            cfg = {
                "module_config": model.config.to_dict(),
                "recipe": self.recipe.as_dict(),
                "tasks": digits.DIGITS8,
                "hash": self.hash,
            }
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
            (tmp / "DONE").write_text("ok\n")
        return self.dir

    def pretrained_module(self):
        self.build()
        module = tiny.make_module(self.recipe)
        module.load_state_dict(load_file(str(self.dir / "pretrained.safetensors")))
        return module

    def finetuned_state(self, task: str) -> tuple[dict[str, torch.Tensor], str]:
        self.build()
        path = self.dir / f"{task}.safetensors"
        if not path.exists():
            raise UserError(f"no fine-tuned model for task {task!r} in the digits8 zoo ({self.dir})")
        try:
            return load_file(str(path)), str(path)
        except Exception as e:  # corrupted file
            raise UserError(f"cannot read {path}: {e}; delete {self.dir} to rebuild the zoo") from None

    def head(self, task: str) -> torch.Tensor:
        self.build()
        if self._heads is None:
            self._heads = load_file(str(self.dir / "heads.safetensors"))
        return self._heads[task]

    def export(self, out: Path) -> Path:
        self.build()
        out.mkdir(parents=True, exist_ok=True)
        for f in self.dir.iterdir():
            if f.suffix in (".safetensors", ".json"):
                shutil.copy2(f, out / f.name)
        return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m otmf_exp.offline.zoo", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build the offline digits8 zoo into the cache")
    ex = sub.add_parser("export", help="export the zoo as safetensors state dicts + config.json")
    ex.add_argument("dir", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        zoo = DigitsZoo()
        if args.cmd == "build":
            print(zoo.build())
        else:
            print(zoo.export(args.dir))
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
