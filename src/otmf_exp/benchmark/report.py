"""Benchmark results: ratios and target checks, and merging re-measured rows into an earlier result."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from otmf_exp.benchmark.plan import AUTHORS_TARGET_ROWS, JOINT, LEVER_RATIOS, REF_JOINT, TARGETS


def summarise(res: dict) -> dict:
    """Ratios and target checks from raw results."""
    r: dict = {}
    steps = res.get("step", {})

    def fused(rows):  # steps >= 2 (step 1 is a copy of τ_1 for every fusing method)
        return [s for s in rows["steps"] if s["step"] >= 2] or rows["steps"]

    for rows in steps.values():
        f = fused(rows)
        rows["median_step_s"] = statistics.median(s["wall_s"] for s in f)
        rows["max_peak_mb"] = max(s["peak_mb"] for s in f)
        rows["peak_over_baseline_mb"] = rows["max_peak_mb"] - rows["baseline_mb"]
    if "otmf" in steps and "adamerging (task)" in steps:
        r["otmf_vs_continual_adamerging_time"] = (
            steps["otmf"]["median_step_s"] / steps["adamerging (task)"]["median_step_s"]
        )
    joint = res.get("ratio", {}).get(REF_JOINT)
    lean = res.get("ratio", {}).get(list(JOINT)[1])
    if lean and "otmf" in steps:
        r["otmf_vs_joint_adamerging_per_task_memory"] = (
            steps["otmf"]["max_peak_mb"] / lean["steps"][0]["peak_mb"]
        )
    if joint and "otmf" in steps:
        jpeak = joint["steps"][0]["peak_mb"]
        r["otmf_vs_joint_adamerging_memory"] = steps["otmf"]["max_peak_mb"] / jpeak
        r["otmf_vs_joint_adamerging_memory_above_baseline"] = steps["otmf"]["peak_over_baseline_mb"] / (
            jpeak - joint["baseline_mb"]
        )
        for row, key in LEVER_RATIOS.items():
            if row in steps:
                r[key] = steps[row]["max_peak_mb"] / jpeak
        # time: joint AdaMerging runs `iterations_flat` steps; compare per iteration
        its_j, its_s = res["plan"]["iterations_flat"], res["plan"]["iterations_step"]
        r["otmf_step_vs_joint_adamerging_time_per_iteration"] = (steps["otmf"]["median_step_s"] / its_s) / (
            joint["steps"][0]["wall_s"] / its_j
        )
    flat = res.get("flat", {})
    worst = 0.0
    for rows in flat.values():
        peaks = {s["step"]: s["peak_mb"] for s in rows["steps"]}
        last = max(peaks)
        rows["last_vs_step2"] = peaks[last] / peaks[2] if 2 in peaks else None
        st = rows["steps"]
        rows["state_growth_mb"] = st[-1]["state_mb"] - st[1]["state_mb"] if len(st) > 1 else 0.0
        # carried-state growth per task after the first: step 1 holds τ₁ (or the first expert set)
        rows["growth_mb_per_task"] = (
            (st[-1]["state_mb"] - st[0]["state_mb"]) / (len(st) - 1) if len(st) > 1 else 0.0
        )
        if rows.get("state_growth", "constant") == "constant":  # per-task methods grow by design
            worst = max(worst, rows["last_vs_step2"] or 0.0)
    if flat:
        r["flat_step_last_vs_step2"] = worst
    if "eval" in res:
        r["eval_vs_raw_forward"] = res["eval"]["evaluate_per_s"] / res["eval"]["raw_per_s"]
    if "e2e" in res:
        r["default_run_warm_s"] = res["e2e"]["warm"]["wall_s"]
    r |= _opcm_ratios(res.get("opcm"))
    r |= _authors_ratios(res.get("authors"))
    checks = {}
    for key, target in TARGETS.items():
        if key in r:
            ok = r[key] >= target if key == "eval_vs_raw_forward" else r[key] <= target
            checks[key] = {"value": r[key], "target": target, "met": ok}
    return {"ratios": r, "targets": checks}


def merge_time(rows: dict) -> float:
    """Merge time of steps 2..T (step 1 only copies τ₁), as FusionBench's "merging model" profile."""
    return sum(s["wall_s"] for s in rows["steps"] if s["step"] >= 2)


def _opcm_ratios(opcm: dict | None) -> dict:
    if not opcm:
        return {}
    auto = opcm["settings"]["auto"]
    r = {"opcm_max_abs_diff_vs_float64": auto["max_abs_diff_vs_float64"]}
    fb = opcm.get("fusionbench")
    if fb:
        r["opcm_vs_fusionbench_time"] = merge_time(auto) / fb["merge_s"]
        r["opcm_vs_fusionbench_memory"] = max(s["peak_mb"] for s in auto["steps"]) / fb["peak_mb"]
    return r


def _authors_ratios(a: dict | None) -> dict:
    """Per row the min over the interleaved rounds of step time and of peak, and each / the authors'."""
    if not a:
        return {}
    rounds = a["rounds"]
    best = {n: {k: min(r[n][k] for r in rounds) for k in ("wall_s", "peak_mb")} for n in rounds[0]}
    for n, b in best.items():  # the step's own memory: peak above the process's memory at its start
        own = [r[n]["peak_mb"] - r[n]["start_mb"] for r in rounds if r[n].get("start_mb") is not None]
        b["own_mb"] = min(own) if own else None
    ref = best["authors"]
    for b in best.values():
        b["time_vs_authors"] = b["wall_s"] / ref["wall_s"]
        b["peak_vs_authors"] = b["peak_mb"] / ref["peak_mb"]
        mine, theirs = b["own_mb"], ref["own_mb"]
        b["own_vs_authors"] = mine / theirs if mine is not None and theirs else None
    a["best"] = best
    out = {}
    for row, key in AUTHORS_TARGET_ROWS.items():
        if row in best:
            out[f"{key}_time"] = best[row]["time_vs_authors"]
            out[f"{key}_memory"] = best[row]["peak_vs_authors"]
            if best[row]["own_vs_authors"] is not None:
                out[f"{key}_own_memory"] = best[row]["own_vs_authors"]
    return out


def merge_into(path: Path, new: dict) -> dict:
    """Earlier results with this run's rows replacing theirs (per method for step/flat/ratio)."""
    if not path.is_file():
        raise SystemExit(f"error: --merge needs an earlier {path}; run without --merge first")
    old = json.loads(path.read_text())
    for key in ("quick", "arch", "autocast"):
        if old.get(key, "float32" if key == "autocast" else None) != new[key]:
            raise SystemExit(
                f"error: --merge: {path} was measured with {key}={old.get(key)!r}, this run "
                f"{new[key]!r}; rerun every part instead"
            )
    if old["machine"].get("malloc_env") != new["machine"].get("malloc_env"):
        raise SystemExit(
            f"error: --merge: {path} was measured with other glibc MALLOC_* settings (--live-rss); "
            "rerun every part instead"
        )
    if (
        old["machine"]["device"] != new["machine"]["device"]
        or old["machine"]["cpu_cores"] != new["machine"]["cpu_cores"]
    ):
        raise SystemExit(
            f"error: --merge: {path} comes from another machine or device; rerun every part instead"
        )
    for part in ("step", "flat", "ratio"):
        if part in new:
            old[part] = {**old.get(part, {}), **new[part]}
    for part in ("opcm", "eval", "e2e", "authors"):
        if part in new:
            old[part] = new[part]
    old["command"] = f"{old['command']}; then {new['command']}"
    old["date"] = f"{old['date']}; updated {new['date']}"
    return old
