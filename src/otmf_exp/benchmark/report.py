"""Benchmark results: ratios and target checks, merging re-measured rows, and BENCHMARKS.md."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pandas as pd

from otmf_exp.benchmark.plan import JOINT, REF_JOINT, TARGETS


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
        if "otmf (tensor masks)" in steps:
            r["otmf_tensor_vs_joint_adamerging_memory"] = steps["otmf (tensor masks)"]["max_peak_mb"] / jpeak
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
    checks = {}
    for key, target in TARGETS.items():
        if key in r:
            ok = r[key] >= target if key == "eval_vs_raw_forward" else r[key] <= target
            checks[key] = {"value": r[key], "target": target, "met": ok}
    return {"ratios": r, "targets": checks}


def _merge_time(rows: dict) -> float:
    """Merge time of steps 2..T (step 1 only copies τ₁), as FusionBench's "merging model" profile."""
    return sum(s["wall_s"] for s in rows["steps"] if s["step"] >= 2)


def _opcm_ratios(opcm: dict | None) -> dict:
    if not opcm:
        return {}
    auto = opcm["settings"]["auto"]
    r = {"opcm_max_abs_diff_vs_float64": auto["max_abs_diff_vs_float64"]}
    fb = opcm.get("fusionbench")
    if fb:
        r["opcm_vs_fusionbench_time"] = _merge_time(auto) / fb["merge_s"]
        r["opcm_vs_fusionbench_memory"] = max(s["peak_mb"] for s in auto["steps"]) / fb["peak_mb"]
    return r


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
    for part in ("opcm", "eval", "e2e"):
        if part in new:
            old[part] = new[part]
    old["command"] = f"{old['command']}; then {new['command']}"
    old["date"] = f"{old['date']}; updated {new['date']}"
    return old


def _fmt(x, nd=2):
    return "—" if x is None else f"{x:.{nd}f}"


def _table(rows: list[dict]) -> list[str]:
    """A markdown table (pandas ``to_markdown``) from rows of already formatted cells."""
    return [pd.DataFrame(rows).astype(str).to_markdown(index=False, disable_numparse=True)]


TARGET_NAMES = {
    "otmf_vs_joint_adamerging_memory": "OTMF step peak memory / joint task-wise AdaMerging (8 tasks)",
    "flat_step_last_vs_step2": "worst constant-state continual method: peak memory at last step / step 2",
    "otmf_vs_continual_adamerging_time": "OTMF step time / continual AdaMerging step (equal iterations, batch)",
    "eval_vs_raw_forward": "evaluate throughput / raw forward throughput",
    "default_run_warm_s": "default offline run, warm (s)",
    "opcm_vs_fusionbench_time": "OPCM (svd auto) merge time / FusionBench 0.2.33 OPCM, 3 steps",
    "opcm_vs_fusionbench_memory": "OPCM (svd auto) peak memory / FusionBench 0.2.33 OPCM, 3 steps",
    "opcm_max_abs_diff_vs_float64": "OPCM (svd auto) max abs weight difference vs the float64 result, 3 steps",
}
INFO_RATIOS = {
    "otmf_vs_joint_adamerging_memory_above_baseline": "same, memory above the process baseline",
    "otmf_tensor_vs_joint_adamerging_memory": "OTMF with tensor-granularity masks / joint AdaMerging",
    "otmf_vs_joint_adamerging_per_task_memory": "OTMF / joint AdaMerging with per-task backward (ours)",
    "otmf_step_vs_joint_adamerging_time_per_iteration": "OTMF / joint AdaMerging time per iteration",
}


def _header(res: dict) -> list[str]:
    m, p = res["machine"], res["plan"]
    mem = "CUDA max allocated" if m["device"].startswith("cuda") else "peak RSS (5 ms sampler, whole process)"
    glibc = f", glibc env {m['malloc_env']}" if m.get("malloc_env") else ""
    return [
        "# Benchmarks",
        "",
        f"Generated by `{res['command']}` on {res['date']} ({'quick' if res['quick'] else 'full'} mode).",
        "",
        f"Machine: {m.get('gpu', m['cpu'])}, {m['cpu_cores']} CPU cores, {m['ram_gb']} GB RAM, torch "
        f"{m['torch']}, {m['torch_threads']} torch threads, device `{m['device']}`, autocast "
        f"{res.get('autocast', 'float32')}, {m['platform']}{glibc}.",
        "",
        f"Model: CLIP image tower `{res['arch']}` (HF CLIPVisionModelWithProjection from its config, random "
        f"weights, {_fmt(res.get('model_mb', 0) * 2**20 / 4e6, 1)} M mergeable parameters), W = one copy of "
        f"the mergeable weights = {_fmt(res.get('model_mb'), 0)} MB. Memory: {mem}. Batch {p['batch_size']} "
        f"per task per iteration; OTMF iterations = AdaMerging steps = {p['iterations_step']} (step, ratio), "
        f"{p['iterations_flat']} (flat, joint AdaMerging). Each row is one run of `python -m otmf_exp.run "
        "task_seq=synthetic ...` in a fresh process; its numbers are the run's own records.",
    ]


def _targets(res: dict) -> list[str]:
    s = res["summary"]
    rows = [
        {
            "target": TARGET_NAMES[key],
            "value": _fmt(c["value"]) if abs(c["value"]) >= 1e-2 else f"{c['value']:.2e}",
            "limit": f"{'≥' if key == 'eval_vs_raw_forward' else '≤'} {c['target']}",
            "met": "yes" if c["met"] else "**no**",
        }
        for key, c in s["targets"].items()
    ]
    rows += [
        {"target": label, "value": _fmt(s["ratios"][key]), "limit": "(info)", "met": ""}
        for key, label in INFO_RATIOS.items()
        if key in s["ratios"]
    ]
    return ["", "## Targets", "", *_table(rows)] if rows else []


def _step_section(res: dict) -> list[str]:
    rows = []
    for name, r in res["step"].items():
        over = r["peak_over_baseline_mb"]
        phases = r["steps"][-1].get("phases") or {}
        rows.append(
            {
                "method": name,
                "step time (s)": _fmt(r["median_step_s"]),
                "peak (MB)": _fmt(r["max_peak_mb"], 0),
                "peak − baseline (MB)": _fmt(over, 0),
                "(peak − baseline) / W": _fmt(over / res["model_mb"], 1),
                "carried state (MB)": _fmt(r["steps"][-1]["state_mb"], 0),
                "phases (s)": ", ".join(f"{k} {v:.1f}" for k, v in phases.items()) or "—",
            }
        )
    return [
        "",
        "## 1. One continual step per method",
        "",
        "Median over steps 2..T (step 1 copies τ₁ for every fusing method); peak = max over those steps; "
        "baseline = the process after loading θ₀ (before step 1); phases from `time_*` records.",
        "",
        *_table(rows),
    ]


def _flat_section(res: dict) -> list[str]:
    n = max(len(v["steps"]) for v in res["flat"].values())
    rows = []
    for name, r in res["flat"].items():
        pk = {st["step"]: st["peak_mb"] for st in r["steps"]}
        rows.append(
            {
                "method": name,
                **{f"step {k}": _fmt(pk.get(k), 0) for k in (2, 5, 10, 15)},
                "last": _fmt(pk[max(pk)], 0),
                "last / step 2": _fmt(r["last_vs_step2"], 3),
                "state growth 2→last (MB)": _fmt(r["state_growth_mb"], 2),
                "growth MB/task (measured / declared)": f"{_fmt(r.get('growth_mb_per_task'), 2)} / "
                f"{_fmt(r.get('declared_growth_mb_per_task'), 2)}",
            }
        )
    return [
        "",
        f"## 2. Peak memory (MB) after each of {n} continual steps",
        "",
        *_table(rows),
        "",
        "Per-step series: `flat` in the JSON file.",
    ]


def _ratio_section(res: dict) -> list[str]:
    p = res["plan"]
    rows = [
        {
            "run": f"{label}, batch {p['batch_size']} per task",
            "time (s)": _fmt(j["steps"][0]["wall_s"]),
            "iterations": p["iterations_flat"],
            "peak (MB)": _fmt(j["steps"][0]["peak_mb"], 0),
            "peak − baseline (MB)": _fmt(j["steps"][0]["peak_mb"] - j["baseline_mb"], 0),
        }
        for label, j in res["ratio"].items()
    ]
    for name in ("otmf", "otmf (tensor masks)", "adamerging (task)"):
        if name in res.get("step", {}):
            r = res["step"][name]
            rows.append(
                {
                    "run": f"{name} continual step, batch {p['batch_size']}",
                    "time (s)": _fmt(r["median_step_s"]),
                    "iterations": p["iterations_step"],
                    "peak (MB)": _fmt(r["max_peak_mb"], 0),
                    "peak − baseline (MB)": _fmt(r["peak_over_baseline_mb"], 0),
                }
            )
    return ["", "## 3. OTMF step vs joint task-wise AdaMerging over 8 tasks", "", *_table(rows)]


def _eval_section(res: dict) -> list[str]:
    e = res["eval"]
    rows = [
        {
            "path": "raw forward (`module(pixel_values=x)`, batches already on the device)",
            "images/s": _fmt(e["raw_per_s"], 1),
        },
        {
            "path": "`Backbone.evaluate` (loader, transfer, functional_call, head, argmax)",
            "images/s": _fmt(e["evaluate_per_s"], 1),
        },
    ]
    return [
        "",
        "## 4. Evaluation throughput",
        "",
        *_table(rows),
        "",
        f"{e['images']} images, batch {e['batch_size']}, best of {res['plan'].get('repeats', 3)} after a warm-up.",
    ]


def _e2e_section(res: dict) -> list[str]:
    rows = [
        {
            "cache": "cold (builds the digits8 zoo)" if kind == "cold" else "warm",
            "wall (s, incl. interpreter start)": _fmt(r["wall_s"], 1),
            "experiment (s)": _fmt(r["experiment_s"], 1),
            "ACC": _fmt(r["acc"]),
        }
        for kind, r in res["e2e"].items()
    ]
    return ["", "## 5. Default offline run (`python -m otmf_exp.run`)", "", *_table(rows)]


def _opcm_section(res: dict) -> list[str]:
    o = res["opcm"]
    rows = [
        {
            "run": f"ours, svd_dtype={svd}",
            "merge time steps 2-3 (s)": _fmt(_merge_time(r)),
            "peak (MB)": _fmt(max(s["peak_mb"] for s in r["steps"]), 0),
            "max abs diff vs float64": f"{r['max_abs_diff_vs_float64']:.2e}",
        }
        for svd, r in o["settings"].items()
    ]
    fb = o.get("fusionbench")
    if fb:
        rows.append(
            {
                "run": "FusionBench 0.2.33 OPCMForCLIP (float32 full SVD)",
                "merge time steps 2-3 (s)": _fmt(fb["merge_s"]),
                "peak (MB)": _fmt(fb["peak_mb"], 0),
                "max abs diff vs float64": "—",
            }
        )
    note = (
        "FusionBench was not run (pass --fusionbench-python PYTHON, an environment with "
        "fusion-bench==0.2.33)."
        if not fb
        else "FusionBench: its own `merging model` profile; peak RSS of its process during `run()` (loading "
        "its checkpoints included, as in a real run). Ours: `time_s` of steps 2-3, max `peak_memory_mb`."
    )
    return [
        "",
        "## 6. OPCM precision and FusionBench",
        "",
        "3 continual steps, α 0.5, same towers on both sides.",
        "",
        *_table(rows),
        "",
        note,
    ]


SECTIONS = {
    "step": _step_section,
    "flat": _flat_section,
    "ratio": _ratio_section,
    "eval": _eval_section,
    "e2e": _e2e_section,
    "opcm": _opcm_section,
}


def render(res: dict) -> str:
    """BENCHMARKS.md: header, targets, then one section per measured part."""
    out = _header(res) + _targets(res)
    for part, section in SECTIONS.items():
        if part in res:
            out += section(res)
    return "\n".join(out) + "\n"
