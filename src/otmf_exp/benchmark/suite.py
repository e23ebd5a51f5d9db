"""The benchmark's parts run in order: which measured runs each part makes, collected into one result."""

from __future__ import annotations

from collections.abc import Callable

from otmf_exp.benchmark.plan import JOINT
from otmf_exp.benchmark.runs import e2e, run_method, run_throughput

Runs = dict[str, tuple[str, dict]]
#: the step-part rows the ratio part needs when the step part itself is not asked for
RATIO_ROWS = ("otmf", "otmf (tensor masks)", "adamerging (task)")


def _continual(base: dict, runs: Runs, tasks: int, what: str, log: Callable[[str], None]) -> dict:
    return {
        name: run_method(
            base
            | {"kind": "continual", "label": f"{what} {name}", "method": m, "overrides": o, "tasks": tasks},
            log,
        )
        for name, (m, o) in runs.items()
    }


def measure(
    parts: list[str],
    base: dict,
    plan: dict,
    runs_step: Runs,
    runs_flat: Runs,
    steps: int,
    log: Callable[[str], None],
) -> dict:
    """Run every part in ``parts``; returns ``{part: results}`` (step, flat, ratio: per table row)."""
    res: dict = {}
    if "step" in parts or "ratio" in parts:
        wanted = runs_step if "step" in parts else {k: v for k, v in runs_step.items() if k in RATIO_ROWS}
        res["step"] = _continual(base, wanted, 3, "step", log)
    if "flat" in parts:
        res["flat"] = _continual(base, runs_flat, steps, "flat", log)
    if "ratio" in parts:
        joint = {"granularity": "task", "steps": plan["iterations_flat"]}
        res["ratio"] = {
            label: run_method(
                base
                | {
                    "kind": "joint",
                    "label": label,
                    "method": "adamerging",
                    "tasks": 8,
                    "overrides": joint | {"backward": mode},
                },
                log,
            )
            for label, mode in JOINT.items()
        }
    if "eval" in parts:
        res["eval"] = run_throughput(base | {"kind": "eval", "label": "eval"}, log)
    if "e2e" in parts:
        res["e2e"] = e2e(log)
    return res


def model_mb(res: dict) -> float | None:
    """W, the size of one copy of the mergeable weights, from whichever part measured it."""
    if "eval" in res:
        return res["eval"]["model_mb"]
    for group in ("step", "flat", "ratio"):
        for rows in res.get(group, {}).values():
            return rows["model_mb"]
    return None
