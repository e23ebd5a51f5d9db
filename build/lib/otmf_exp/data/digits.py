"""The offline embedded suite's data: eight tasks built from scikit-learn's bundled digits.

scikit-learn ships 1,797 8×8 grey-scale digit images inside the package, so this suite needs
no network. Each task applies a fixed, deterministic transformation to the images (and for
``parity`` a different label set), giving eight related but conflicting tasks -- the same kind
of problem as CLIP's eight vision tasks. Images are held out once: 30% of the images form every
task's test split and are never used for pre-training or fine-tuning.

Images are returned as float tensors ``[N, 3, 8, 8]`` normalised to zero mean / unit std of the
clean training images (three identical channels, as a CLIP image tower expects RGB).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from otmf_exp.data.base import TensorTaskData, validation_split

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


# name -> (image transform on [N, 8, 8] in 0..16, label map or None, class names or None)
TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "rot90": lambda x: np.rot90(x, k=1, axes=(1, 2)),
    "rot180": lambda x: np.rot90(x, k=2, axes=(1, 2)),
    "flip": lambda x: x[:, :, ::-1],
    "invert": lambda x: 16.0 - x,
    "shift": _shift,
    "noise": _noise,
    "occlude": _occlude,
    "parity": lambda x: np.rot90(x, k=3, axes=(1, 2)),
}
DIGITS8 = ["rot90", "rot180", "flip", "invert", "shift", "noise", "occlude", "parity"]


def task_classnames(task: str) -> list[str]:
    return ["even", "odd"] if task == "parity" else list(DIGIT_NAMES)


def task_labels(task: str, y: np.ndarray) -> np.ndarray:
    return y % 2 if task == "parity" else y


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
    if task not in TRANSFORMS:
        raise KeyError(task)
    x, y = load_digits_arrays()
    tr, te = image_split()
    mean, std = _stats()
    xt = TRANSFORMS[task](x)
    yt = torch.from_numpy(task_labels(task, y))
    xs = _normalise(xt, mean, std)
    train_x, train_y = xs[tr], yt[tr]
    _, val = validation_split(len(tr), 0.1, 0)
    splits = {
        "train": (train_x, train_y),  # full train (the head-tuning / fine-tuning pool)
        "validation": (train_x[val], train_y[val]),
        "test": (xs[te], yt[te]),
    }
    return TensorTaskData(task, splits, task_classnames(task))
