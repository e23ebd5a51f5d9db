"""The benchmark's parts run in order: which measured runs each part makes, collected into one result."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from otmf_exp.benchmark.plan import AUTHORS_ROWS, JOINT, OPCM_SVD
from otmf_exp.benchmark.runs import e2e, run_authors, run_fusionbench, run_method, run_throughput

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


def _opcm(base: dict, fusionbench_python: str | None, log: Callable[[str], None]) -> dict:
    """OPCM over 3 continual steps in each SVD precision, max |Δw| of the merged weights against
    float64, and FusionBench 0.2.33's OPCM on the same towers when ``fusionbench_python`` is given."""
    from safetensors.torch import load_file

    out: dict = {"settings": {}}
    with tempfile.TemporaryDirectory() as tmp:
        merged = {}
        for svd in OPCM_SVD:
            path = Path(tmp) / f"{svd}.safetensors"
            spec = base | {
                "kind": "continual",
                "label": f"opcm svd_dtype={svd}",
                "method": "opcm",
                "overrides": {"svd_dtype": svd},
                "tasks": 3,
                "merged_to": str(path),
            }
            out["settings"][svd] = run_method(spec, log)
            merged[svd] = load_file(str(path))
        for svd in OPCM_SVD:
            out["settings"][svd]["max_abs_diff_vs_float64"] = max(
                float((merged[svd][k] - merged["float64"][k]).abs().max()) for k in merged["float64"]
            )
    if fusionbench_python:
        out["fusionbench"] = run_fusionbench(base | {"tasks": 3, "alpha": 0.5}, fusionbench_python, log)
    return out


def _authors(
    base: dict, plan: dict, runs: Runs, authors: tuple[str, str], log: Callable[[str], None]
) -> dict:
    """One OTMF fusion step (step 2 of 2 tasks, head tuning off: the authors' compute_sr_mask tunes no
    head) of each of ``AUTHORS_ROWS`` and the authors' ``compute_sr_mask`` on the same tower, θ₀, τ
    and batch size, interleaved round by round (``repeats`` rounds), each in a fresh process."""
    python, repo = authors
    rows = {name: runs[name] for name in AUTHORS_ROWS if name in runs}
    out: dict = {"rounds": [], "iterations": plan["iterations_step"]}
    for r in range(int(base["repeats"])):
        got = {}
        for name, (m, o) in rows.items():
            spec = base | {
                "kind": "continual",
                "label": f"authors round {r}: {name}",
                "method": m,
                "overrides": o | {"head_tuning.enabled": False},
                "tasks": 2,
            }
            step = run_method(spec, log)["steps"][1]
            got[name] = {k: step[k] for k in ("wall_s", "peak_mb", "start_mb", "phases")}
        spec = base | {
            "label": f"authors round {r}: authors",
            "repo": repo,
            "iterations": plan["iterations_step"],
            "batch_size": plan["batch_size"],
        }
        got["authors"] = run_authors(spec, python, log)
        got["authors"]["start_mb"] = got["authors"]["baseline_mb"]
        out["rounds"].append(got)
    return out


def measure(
    parts: list[str],
    base: dict,
    plan: dict,
    runs_step: Runs,
    runs_flat: Runs,
    steps: int,
    log: Callable[[str], None],
    fusionbench_python: str | None = None,
    on_part: Callable[[dict], None] = lambda res: None,
    authors: tuple[str, str] | None = None,
) -> dict:
    """Run every part in ``parts``; returns ``{part: results}`` (step, flat, ratio: per table row).
    ``on_part(results so far)`` is called after each part (the CLI saves them, so a run cut short
    keeps what it measured)."""
    res: dict = {}
    if "step" in parts or "ratio" in parts:
        wanted = runs_step if "step" in parts else {k: v for k, v in runs_step.items() if k in RATIO_ROWS}
        res["step"] = _continual(base, wanted, 3, "step", log)
        on_part(res)
    if "flat" in parts:
        res["flat"] = _continual(base, runs_flat, steps, "flat", log)
        on_part(res)
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
        on_part(res)
    if "opcm" in parts:
        res["opcm"] = _opcm(base, fusionbench_python, log)
        on_part(res)
    if "eval" in parts:
        res["eval"] = run_throughput(base | {"kind": "eval", "label": "eval"}, log)
        on_part(res)
    if "e2e" in parts:
        res["e2e"] = e2e(log)
        on_part(res)
    if "authors" in parts and authors:
        res["authors"] = _authors(base, plan, runs_step, authors, log)
        on_part(res)
    return res


def model_mb(res: dict) -> float | None:
    """W, the size of one copy of the mergeable weights, from whichever part measured it."""
    if "eval" in res:
        return res["eval"]["model_mb"]
    for group in ("step", "flat", "ratio"):
        for rows in res.get(group, {}).values():
            return rows["model_mb"]
    if "opcm" in res:
        return res["opcm"]["settings"]["float64"]["model_mb"]
    return None
