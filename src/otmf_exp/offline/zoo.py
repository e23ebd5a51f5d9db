"""The offline suite's model zoo: the pre-trained tower once, each task's model on demand, cached.

``python -m otmf_exp.offline.zoo build [--tasks a,b]`` builds (or verifies) the cache;
``python -m otmf_exp.offline.zoo export DIR [--tasks a,b] [--force]`` writes ``pretrained.safetensors``,
one ``<task>.safetensors`` per task (vision-tower state dicts), ``heads.safetensors`` and
``config.json`` (the module config and recipe) so other merging tools can run on exactly the same
models; atomically (a temp dir renamed into place), refusing a non-empty DIR unless ``--force``.
Without ``--tasks``, the tasks of ``conf/task_seq/digits8.yaml``.

Cache layout, in ``$OTMF_EXP_CACHE`` (default ``~/.cache/otmf_exp``)::

    digits-<recipe hash>/pretrained.safetensors   pre-training depends on the recipe only
    digits-<recipe hash>/<task>.safetensors       fine-tuned tower + zero-shot head ("head")

A task file stores, in its safetensors metadata, the hash of (recipe, task name, fine-tuning seed,
digest of the task's training images/labels/class names); a missing or stale file (a changed
transform, label rule or seed) is rebuilt for that task alone. ``digits-<hash>/digests.json`` holds
the sha256 of each file as built; a file whose bytes no longer match it (e.g. another task's weights
under a matching key) is logged and rebuilt before use; a file the index lacks (built by an older
version) is recorded on first use. Every file is written to a temp
file and moved into place; a file another process published meanwhile is kept, never clobbered.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from otmf_exp.data import digits
from otmf_exp.data.base import TensorTaskData
from otmf_exp.errors import UserError, cli_main
from otmf_exp.hub.resolve import writable_cache
from otmf_exp.models.checks import check_file_state
from otmf_exp.offline import tiny_clip as tiny
from otmf_exp.runtime import digest
from otmf_exp.runtime.files import replace_dir, temp_file, write_error, write_json
from otmf_exp.runtime.session import fixed_threads

log = logging.getLogger(__name__)

HEAD = "head"  # the zero-shot head's name inside a cached task file (never a vision-tower key)
SUITE = "digits8"  # the task_seq whose task list is the CLI's default


def cache_root() -> Path:
    return Path(os.environ.get("OTMF_EXP_CACHE", Path.home() / ".cache" / "otmf_exp"))


def suite_tasks(name: str = SUITE) -> list[str]:
    """The task list of ``conf/task_seq/<name>.yaml`` (the packaged ``otmf_exp.conf``)."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    text = (files("otmf_exp.conf") / "task_seq" / f"{name}.yaml").read_text()
    return [str(t) for t in OmegaConf.create(text).tasks]


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def data_digest(data: TensorTaskData) -> str:
    """sha256 of a task's training images, labels and class names (what its model is built from)."""
    x, y = data.splits["train"]
    h = hashlib.sha256()
    for t in (x, y):
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.contiguous().numpy().tobytes())
    h.update(json.dumps(data.classnames).encode())
    return h.hexdigest()


def stored_key(path: Path) -> str | None:
    """The key a cached file was built with (``None`` if absent); unreadable -> :class:`UserError`."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("key", "")
    except Exception as e:  # corrupted file
        raise UserError(f"cannot read {path}: {e}; delete it to rebuild") from None


def publish(path: Path, tensors: dict[str, torch.Tensor], key: str) -> None:
    """Save ``tensors`` (metadata ``key``) to a temp file beside ``path``, then move it into place;
    a file with the same key that another process published meanwhile is kept (theirs). A failed
    write (full disk, permissions) is one line naming the file."""
    try:
        _publish(path, tensors, key)
    except UserError:
        raise
    except Exception as e:  # OSError, or safetensors' wrapper of one
        raise write_error(path, e, "set OTMF_EXP_CACHE to a writable directory with free space") from None


def _publish(path: Path, tensors: dict[str, torch.Tensor], key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file(path)
    try:
        save_file(tensors, tmp, metadata={"key": key})
        try:
            os.link(tmp, path)  # atomic create; fails if the target exists
        except FileExistsError:
            try:
                theirs = stored_key(path)
            except UserError:
                theirs = None
            if theirs != key:  # a stale or broken file: replace it
                os.replace(tmp, path)
        except OSError:  # a file system without hard links
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # corrupted file
        raise UserError(f"cannot read {path}: {e}; delete it to rebuild {what}") from None


#: torch intra-op threads every zoo file is built with (its bytes then do not depend on the caller's)
BUILD_THREADS = 1


class DigitsZoo:
    """The pre-trained tiny tower and, per task, a fine-tuned tower and zero-shot head, cached on disk."""

    def __init__(
        self, recipe: tiny.TinyRecipe | None = None, root: Path | None = None, progress: bool = True
    ) -> None:
        self.recipe = recipe or tiny.TinyRecipe()
        # the build's thread count is part of the files' identity (float sums differ between 1 and 2
        # threads): caches built before it was fixed live under another hash and are rebuilt once
        self.hash = _digest({"recipe": self.recipe.as_dict(), "build_threads": BUILD_THREADS})[:12]
        self.dir = (root or cache_root()) / f"digits-{self.hash}"
        self.progress = progress
        self._keys: dict[str, str] = {}
        self._heads: dict[str, torch.Tensor] = {}

    @property
    def pretrained_path(self) -> Path:
        return self.dir / "pretrained.safetensors"

    def task_path(self, task: str) -> Path:
        return self.dir / f"{task}.safetensors"

    @property
    def index_path(self) -> Path:
        return self.dir / "digests.json"

    def _note_built(self, path: Path) -> None:
        """Record the sha256 of the file just built in the zoo's index (atomic rewrite)."""
        index = digest.read_map(self.index_path)
        index[path.name] = digest.file_digest(path)
        digest.write_map(self.index_path, index)

    def _verified(self, path: Path) -> bool:
        """Whether ``path`` still holds the bytes the zoo built (a file the index lacks is recorded);
        a mismatch is logged and the file removed (the caller rebuilds it)."""
        sha = digest.file_digest(path)
        index = digest.read_map(self.index_path)
        want = index.get(path.name)
        if want is None:
            log.info("recording the content digest of %s (%s)", path, digest.short(sha))
            index[path.name] = sha
            digest.write_map(self.index_path, index)
            return True
        if want == sha:
            return True
        log.warning(
            "%s has content %s, the zoo built %s: rebuilding it",
            path,
            digest.short(sha),
            digest.short(str(want)),
        )
        path.unlink(missing_ok=True)
        return False

    def _checked(self, path: Path, tasks: list[str]) -> Path:
        """``path`` after the content check (rebuilt once on a mismatch), its digest recorded."""
        if not self._verified(path):
            self.build(tasks)
            if not self._verified(path):
                raise UserError(f"{path} does not match the zoo's digest after a rebuild; delete {self.dir}")
        digest.record(path)
        return path

    def task_seed(self, task: str) -> int:
        """Fine-tuning seed: the recipe's seed + the task's offset (explicit, or from its name)."""
        return self.recipe.seed + digits.finetune_seed_offset(task)

    def task_key(self, task: str) -> str:
        """Hash of (recipe, task name, fine-tuning seed, training-data digest): the task file's key."""
        if task not in self._keys:
            data = digits.build_task(task)
            parts = {"recipe": self.recipe.as_dict(), "task": task, "seed": self.task_seed(task)}
            self._keys[task] = _digest({**parts, "data": data_digest(data)})
        return self._keys[task]

    def _missing(self, tasks: Iterable[str]) -> list[str]:
        # task_key first: it validates the name (an unknown one is a UserError) before any path use
        return [t for t in dict.fromkeys(tasks) if self.task_key(t) != stored_key(self.task_path(t))]

    def is_built(self, tasks: Iterable[str] = ()) -> bool:
        """Whether the pre-trained tower and the models of ``tasks`` are cached and current."""
        return self.pretrained_path.exists() and not self._missing(tasks)

    def build(self, tasks: Iterable[str] = ()) -> Path:
        """Build what is missing: the pre-trained tower (once per recipe) and the ``tasks`` not cached."""
        todo = self._missing(tasks)
        pre_missing = not self.pretrained_path.exists()
        if not todo and not pre_missing:
            return self.dir
        writable_cache(self.dir)  # before minutes of training, not after
        with fixed_threads(BUILD_THREADS):  # the same bytes whatever the caller's thread count (tested)
            self._build(todo, pre_missing)
        return self.dir

    def _build(self, todo: list[str], pre_missing: bool) -> None:
        from otmf_exp.runtime.progress import progress

        log.info("building the offline digits zoo into %s: %s", self.dir, ", ".join(todo) or "pre-trained")
        with progress(total=len(todo) + pre_missing, desc="build digits zoo", enabled=self.progress) as bar:
            if pre_missing:
                bar.set_description("build digits zoo: pre-training")
                x, y = digits.pretraining_data()
                model = tiny.pretrain(self.recipe, x, y)
                publish(
                    self.pretrained_path,
                    {k: v.contiguous() for k, v in model.state_dict().items()},
                    self.hash,
                )
                self._note_built(self.pretrained_path)
                bar.update(1)
            pre = _load(self.pretrained_path, "the pre-trained tower")
            for task in todo:
                bar.set_description(f"build digits zoo: {task}")
                self._build_task(task, pre)
                bar.update(1)

    def _build_task(self, task: str, pre: dict[str, torch.Tensor]) -> None:
        data = digits.build_task(task)
        head = tiny.prototype_head(tiny.load_module(self.recipe, pre), data, self.recipe).contiguous()
        ft = tiny.finetune(pre, self.recipe, data, head, seed=self.task_seed(task))
        publish(self.task_path(task), {**ft, HEAD: head}, self.task_key(task))
        self._note_built(self.task_path(task))
        self._heads.pop(task, None)

    def pretrained_module(self):
        self.build()
        self._checked(self.pretrained_path, [])
        sd = _load(self.pretrained_path, "the pre-trained tower")
        keys = tiny.make_module(self.recipe).state_dict()  # tensor checks: models/checks.py
        return tiny.load_module(self.recipe, check_file_state(sd, keys, str(self.pretrained_path)))

    def _load_task(self, task: str) -> dict[str, torch.Tensor]:
        self.build([task])
        path = self._checked(self.task_path(task), [task])
        sd = _load(path, f"task {task!r}")
        if HEAD not in sd:
            raise UserError(f"{path} has no zero-shot head; delete it to rebuild task {task!r}")
        self._heads[task] = sd.pop(HEAD)
        return sd

    def finetuned_state(self, task: str) -> tuple[dict[str, torch.Tensor], str]:
        """Task ``task``'s fine-tuned vision tower (built on first use) and where it came from."""
        return self._load_task(task), str(self.task_path(task))

    def head(self, task: str) -> torch.Tensor:
        """Task ``task``'s zero-shot head ``[C, D]`` (built on first use)."""
        if task not in self._heads:
            self._load_task(task)
        return self._heads[task]

    def export(self, out: Path, tasks: Iterable[str] | None = None, force: bool = False) -> Path:
        """Write the pre-trained tower, one state dict per task, the heads and ``config.json`` to
        ``out``. A non-empty ``out`` is refused unless ``force`` (then replaced as a whole). The
        files are written into a temp directory beside ``out`` and moved into place at the end,
        so ``out`` is never half-written."""
        tasks = list(dict.fromkeys(suite_tasks() if tasks is None else tasks))
        out = Path(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
            raise UserError(
                f"{out} exists and is not empty; choose a new directory or pass --force to replace it"
            )
        self.build(tasks)
        module = self.pretrained_module()
        files = {"pretrained": _load(self.pretrained_path, "the pre-trained tower")}
        files |= {t: self.finetuned_state(t)[0] for t in tasks}
        files["heads"] = {t: self.head(t) for t in tasks}
        cfg = {
            "module_config": module.config.to_dict(),
            "recipe": self.recipe.as_dict(),
            "tasks": tasks,
            "hash": self.hash,
            "task_seeds": {t: self.task_seed(t) for t in tasks},
            "task_keys": {t: self.task_key(t) for t in tasks},
        }
        staged = None
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
            for name, tensors in files.items():
                save_file(tensors, str(staged / f"{name}.safetensors"))
            write_json(staged / "config.json", cfg)
            replace_dir(staged, out)
        except UserError:
            raise
        except Exception as e:  # OSError or safetensors' wrapper of one (full disk, permissions)
            raise write_error(out, e) from None
        finally:
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)
        return out


def _task_list(text: str | None) -> list[str]:
    if text is None:
        return suite_tasks()
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise UserError("--tasks needs at least one task name, e.g. --tasks rot90,flip")
    return tasks


def main(argv: list[str] | None = None) -> int:
    """``python -m otmf_exp.offline.zoo``, through the shared wrapper: bad input / unwritable files
    are one ``error:`` line (exit 2), Ctrl-C is ``interrupted`` (exit 130; no half-built file is
    left, files are written beside their name and renamed)."""
    return cli_main(
        _main,
        argv,
        interrupted_line=lambda e: "interrupted; the models built so far are kept, rerun to build the rest",
    )


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m otmf_exp.offline.zoo", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    tasks_help = f"comma-separated task names (default: the {SUITE} task_seq's tasks)"
    b = sub.add_parser("build", help="build the pre-trained tower and the tasks' models into the cache")
    b.add_argument("--tasks", help=tasks_help)
    ex = sub.add_parser("export", help="export the zoo as safetensors state dicts + config.json")
    ex.add_argument("dir", type=Path)
    ex.add_argument("--tasks", help=tasks_help)
    ex.add_argument("--force", action="store_true", help="replace DIR when it exists and is not empty")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    zoo, tasks = DigitsZoo(), _task_list(args.tasks)
    result = zoo.build(tasks) if args.cmd == "build" else zoo.export(args.dir, tasks, force=args.force)
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
