"""Continual-learning metrics on an accuracy matrix (all values in %).

``a[j][i]`` = accuracy on task i after merging step j (None where i > j, i.e. not yet seen).
ACC = mean_i a[T][i]; BWT = 1/(T−1) Σ_{i<T} (a[T][i] − a[i][i]); normalized ACC =
mean_i a[T][i] / individual_i (in %).
"""

from __future__ import annotations

from collections.abc import Sequence

Matrix = Sequence[Sequence[float | None]]


def final_row(a: Matrix) -> list[float]:
    row = a[-1]
    if any(v is None for v in row):
        raise ValueError("the last row of the accuracy matrix must be complete")
    return [float(v) for v in row]


def acc(a: Matrix) -> float:
    """Average accuracy of the final model over all tasks."""
    row = final_row(a)
    return sum(row) / len(row)


def bwt(a: Matrix) -> float | None:
    """Backward transfer; None for a single task or a matrix without a diagonal (joint protocol)."""
    t = len(a[-1])
    if t < 2 or len(a) != t or any(a[i][i] is None for i in range(t)):
        return None
    row = final_row(a)
    return sum(row[i] - float(a[i][i]) for i in range(t - 1)) / (t - 1)


def normalized_acc(a: Matrix, individual: Sequence[float]) -> float:
    """Mean over tasks of final accuracy / individual (fine-tuned) accuracy, in %."""
    row = final_row(a)
    if len(individual) != len(row):
        raise ValueError("one individual accuracy per task is required")
    return 100.0 * sum(r / i for r, i in zip(row, individual) if i > 0) / len(row)


def matrix_csv(a: Matrix, order: Sequence[str]) -> str:
    """CSV with a header of task names and one row per step (empty cell = not yet seen)."""
    lines = ["step," + ",".join(order)]
    for j, row in enumerate(a):
        cells = ["" if v is None else f"{v:.4f}" for v in row]
        cells += [""] * (len(order) - len(cells))
        lines.append(f"{j + 1}," + ",".join(cells))
    return "\n".join(lines) + "\n"
