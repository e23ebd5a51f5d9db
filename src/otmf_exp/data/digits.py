"""The offline embedded suite's data: tasks built from scikit-learn's bundled digits.

scikit-learn ships 1,797 8×8 grey-scale digit images inside the package, so this suite needs
no network. Each task (an entry of :data:`TASKS`) applies a fixed, deterministic transformation
to the images (and for ``parity`` a different label set), giving related but conflicting tasks
-- the same kind of problem as CLIP's eight vision tasks; ``conf/task_seq/digits8.yaml`` lists
the eight of the default suite. Images are held out once: 30% of the images form every
task's test split and are never used for pre-training or fine-tuning.

Images are returned as float tensors ``[N, 3, 8, 8]`` normalised to zero mean / unit std of the
clean training images (three identical channels, as a CLIP image tower expects RGB).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from otmf_exp.data.base import TensorTaskData, validation_split
from otmf_exp.errors import UserError

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEST_FRACTION = 0.3
SPLIT_SEED = 0


def _rng_noise(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 1.0, size=shape)


def _occlude(x: np.ndarray) -> np.ndarray:
    y = x.copy()
    y[:, :, 4:] = 0.0  # right half blanked
    return y


def _noise(x: np.ndarray) -> np.ndarray:
    return x + 6.0 * _rng_noise(x.shape, seed=1234)


def _shift(x: np.ndarray) -> np.ndarray:
    return np.roll(x, shift=(3, 3), axis=(1, 2))


@dataclass(frozen=True)
class DigitsTask:
    """One digits task: an image transform, an optional label rule with its class names, a seed.

    ``transform`` maps images ``[N, 8, 8]`` (float, 0..16) to images of the same shape;
    ``labels`` maps digit labels ``[N]`` (0..9) to class indices into ``classnames`` (``None``:
    the digit itself); ``seed`` is the fine-tuning seed offset added to the recipe's seed
    (``None``: derived from the task's name, see :func:`finetune_seed_offset`).
    """

    transform: Callable[[np.ndarray], np.ndarray]
    labels: Callable[[np.ndarray], np.ndarray] | None = None
    classnames: tuple[str, ...] = tuple(DIGIT_NAMES)
    seed: int | None = None


# Adding a task = one entry here + listing its name in a task_seq YAML (conf/task_seq/digits8.yaml).
# The eight original tasks pin ``seed`` to the offsets they were built with (1..8), so their
# models stay bit-identical; a new task can leave it out.
TASKS: dict[str, DigitsTask] = {
    "rot90": DigitsTask(lambda x: np.rot90(x, k=1, axes=(1, 2)), seed=1),
    "rot180": DigitsTask(lambda x: np.rot90(x, k=2, axes=(1, 2)), seed=2),
    "flip": DigitsTask(lambda x: x[:, :, ::-1], seed=3),
    "invert": DigitsTask(lambda x: 16.0 - x, seed=4),
    "shift": DigitsTask(_shift, seed=5),
    "noise": DigitsTask(_noise, seed=6),
    "occlude": DigitsTask(_occlude, seed=7),
    "parity": DigitsTask(
        lambda x: np.rot90(x, k=3, axes=(1, 2)), labels=lambda y: y % 2, classnames=("even", "odd"), seed=8
    ),
}


def get_task(name: str) -> DigitsTask:
    """The entry of ``name`` in :data:`TASKS`; an unknown name is a one-line :class:`UserError`."""
    if name not in TASKS:
        raise UserError(
            f"unknown digits task {name!r}; known: {', '.join(sorted(TASKS))} "
            f"(add one to TASKS in otmf_exp/data/digits.py and list it in a task_seq YAML)"
        )
    return TASKS[name]


def finetune_seed_offset(name: str) -> int:
    """The task's fine-tuning seed offset: its explicit ``seed``, else ``crc32(name)``."""
    task = get_task(name)
    return task.seed if task.seed is not None else zlib.crc32(name.encode())


def task_classnames(task: str) -> list[str]:
    return list(get_task(task).classnames)


def task_labels(task: str, y: np.ndarray) -> np.ndarray:
    rule = get_task(task).labels
    return y if rule is None else np.asarray(rule(y), dtype=np.int64)


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The raw digits ``(images [1797, 8, 8] float64 in 0..16, labels [1797])``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float64), d.target.astype(np.int64)


def image_split() -> tuple[np.ndarray, np.ndarray]:
    """Fixed (train_idx, test_idx) over the 1,797 images (stratified by digit, seed 0)."""
    from sklearn.model_selection import train_test_split

    _, y = load_digits_arrays()
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y)
    return np.sort(tr), np.sort(te)


def _normalise(x: np.ndarray, mean: float, std: float) -> Tensor:
    t = torch.from_numpy(np.ascontiguousarray((x - mean) / std)).float()
    return t.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def _stats() -> tuple[float, float]:
    x, _ = load_digits_arrays()
    tr, _ = image_split()
    return float(x[tr].mean()), float(x[tr].std())


def pretraining_data() -> tuple[Tensor, Tensor]:
    """Clean training images and digit labels (the "pre-training" distribution)."""
    x, y = load_digits_arrays()
    tr, _ = image_split()
    mean, std = _stats()
    return _normalise(x[tr], mean, std), torch.from_numpy(y[tr])


def build_task(task: str) -> TensorTaskData:
    """One digits task with ``train`` / ``validation`` (10% of train, seed 0) / ``test`` splits."""
    spec = get_task(task)
    x, y = load_digits_arrays()
    tr, te = image_split()
    mean, std = _stats()
    xt = spec.transform(x)
    labels = task_labels(task, y)
    if (
        xt.shape != x.shape
        or labels.shape != y.shape
        or not 0 <= labels.min() <= labels.max() < len(spec.classnames)
    ):
        raise UserError(
            f"digits task {task!r}: the transform must keep images {x.shape} and the labels must lie in "
            f"0..{len(spec.classnames) - 1} (got images {xt.shape}, labels {labels.min()}..{labels.max()})"
        )
    yt = torch.from_numpy(labels)
    xs = _normalise(xt, mean, std)
    train_x, train_y = xs[tr], yt[tr]
    _, val = validation_split(len(tr), 0.1, 0)
    splits = {
        "train": (train_x, train_y),  # full train (the head-tuning / fine-tuning pool)
        "validation": (train_x[val], train_y[val]),
        "test": (xs[te], yt[te]),
    }
    return TensorTaskData(task, splits, list(spec.classnames))
