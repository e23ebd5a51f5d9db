"""Time and memory of every merging method on the real ViT-B/32 architecture; writes BENCHMARKS.md + JSON.

    python scripts/bench.py                  # full: paper iterations (OTMF 100, AdaMerging 100 = equal)
    python scripts/bench.py --quick          # CPU-sized: fewer iterations, same architecture and batch
    python scripts/bench.py --only flat,ratio --out /tmp/bench

Measurements (each method runs in its own fresh process, so one method's allocator state never
leaks into another's numbers; memory = CUDA max allocated on GPU, sampled peak RSS on CPU):

  step   per continual step of each method: wall time, peak memory, phase times, carried-state size
  flat   peak memory after each of ``--steps`` (20) continual steps of every continual method
  ratio  OTMF step vs joint task-wise AdaMerging over 8 tasks at equal batch (memory, time), and
         OTMF step vs continual AdaMerging step at equal iterations and batch (time)
  eval   Backbone.evaluate throughput vs a raw forward pass of the same module on the same images
  e2e    the offline default run (``python -m otmf_exp.run``) end to end, cold cache and warm

Models: ``otmf_exp.offline.synthetic`` -- CLIPVisionModelWithProjection built from ViT-B/32's config with
random weights (87.5 M mergeable parameters), θ_t = θ₀ + seeded noise, random 224×224 images.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("step", "flat", "ratio", "eval", "e2e")
MARK = "BENCH_RESULT "
#: joint task-wise AdaMerging runs of the ratio part: the FusionBench implementation (the paper's
#: comparator; the memory target is against it) and our default, which backpropagates per task
JOINT = {
    "joint adamerging (task), 8 tasks, summed backward (FusionBench)": "summed",
    "joint adamerging (task), 8 tasks, per-task backward (default)": "per_task",
}
REF_JOINT = next(iter(JOINT))
LIVE_RSS_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576"}
TARGETS = {
    "otmf_vs_joint_adamerging_memory": 0.5,
    "flat_step_last_vs_step2": 1.05,
    "otmf_vs_continual_adamerging_time": 1.5,
    "eval_vs_raw_forward": 0.9,
    "default_run_warm_s": 120.0,
}


# ---------------------------------------------------------------------------------------------
# plan: which method configurations each part runs
# ---------------------------------------------------------------------------------------------
def plan(quick: bool) -> dict:
    """Iteration counts. Full = the paper's OTMF recipe (100 iterations, batch 16) with AdaMerging at
    equal iterations; quick shrinks iteration counts only (never the architecture or the batch)."""
    it_step = 10 if quick else 100  # part step/ratio: OTMF iterations = AdaMerging steps
    it_flat = 2 if quick else 10  # part flat: memory does not depend on the count (>= 2: both OTMF sides)
    eval_batches = 1 if quick else 4
    return {
        "iterations_step": it_step,
        "iterations_flat": it_flat,
        "otmf_eval_batches": eval_batches,
        "batch_size": 16,
        "eval_images": 128 if quick else 512,
        "eval_batch_size": 64 if quick else 128,
    }


def method_runs(iterations: int, eval_batches: int) -> dict[str, tuple[str, dict]]:
    """name in the tables -> (method, overrides)."""
    return {
        "averaging": ("averaging", {}),
        "task_arithmetic": ("task_arithmetic", {}),
        "ties": ("ties", {}),
        "magmax": ("magmax", {}),
        "opcm": ("opcm", {}),
        "adamerging (task)": ("adamerging", {"granularity": "task", "steps": iterations}),
        "adamerging (layer)": ("adamerging", {"granularity": "layer", "steps": iterations}),
        "otmf": ("otmf", {"iterations": iterations, "eval_batches": eval_batches}),
        "otmf (tensor masks)": (
            "otmf",
            {"iterations": iterations, "eval_batches": eval_batches, "mask.granularity": "tensor"},
        ),
    }


# ---------------------------------------------------------------------------------------------
# worker side (a fresh process per measurement)
# ---------------------------------------------------------------------------------------------
def _method_config(method: str, overrides: dict):
    from hydra import compose, initialize_config_module

    from otmf_exp.config import method_config, register_configs

    register_configs()
    ovr = [f"method={method}"] + [f"method.{k}={v}" for k, v in overrides.items()]
    with initialize_config_module("otmf_exp.conf", version_base="1.3"):
        cfg = compose("run", overrides=ovr)
    return method_config(cfg)


class _Mem:
    def __init__(self, device) -> None:
        import psutil
        import torch

        self.torch, self.device, self.proc = torch, device, psutil.Process()

    def now_mb(self) -> float:
        if self.device.type == "cuda":
            return self.torch.cuda.memory_allocated(self.device) / 2**20
        return self.proc.memory_info().rss / 2**20


def _setup(spec: dict):
    import torch

    from otmf_exp.offline.synthetic import SyntheticBackbone

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    bb = SyntheticBackbone(spec["arch"], device, autocast=spec.get("autocast", "float32"))
    bb.batch_size = int(spec["eval_batch_size"])
    return torch, device, bb


def worker(spec: dict) -> dict:
    torch, device, bb = _setup(spec)
    from otmf_exp.merging import METHODS, MethodContext, TaskInput
    from otmf_exp.merging.task_vectors import num_bytes
    from otmf_exp.runtime.measure import measure

    mem = _Mem(device)
    model_mb = num_bytes(bb.pretrained_state()) / 2**20
    if spec["kind"] == "eval":
        return _eval_worker(spec, torch, device, bb) | {"model_mb": model_mb}
    n = int(spec["tasks"])
    names = [f"task{i:02d}" for i in range(n)]
    sizes = {"train": 64, "validation": 16, "test": 64}
    datas = {t: bb.task_data(t, sizes) for t in names}
    heads = {t: bb.zero_shot_head(datas[t]) for t in names}
    records: dict = {}
    ctx = MethodContext(
        bb,
        device,
        torch.Generator().manual_seed(0),
        progress=False,
        record=lambda k, v: records.__setitem__(k, v),
    )
    method = METHODS[spec["method"]](
        _method_config(spec["method"], spec["overrides"]), ctx, protocol=spec["kind"]
    )
    pre = bb.pretrained_state()

    def task_input(i: int):
        t = names[i]
        return TaskInput(
            t,
            i,
            bb.load_finetuned(t),
            heads[t],
            datas[t],
            datas[names[i - 1]] if i else None,
            {s: datas[s] for s in names[: i + 1]},
            owned=True,
        )

    base = mem.now_mb()
    out = {
        "model_mb": model_mb,
        "baseline_mb": base,
        "memory_kind": "cuda_max_allocated" if device.type == "cuda" else "cpu_rss",
        "steps": [],
    }
    if spec["kind"] == "joint":
        with measure(device) as u:
            state = method.joint(pre, (task_input(i) for i in range(n)))
        out["steps"].append(
            {
                "step": n,
                "wall_s": u.wall_s,
                "peak_mb": u.peak_memory_mb,
                "state_mb": num_bytes(state.merged) / 2**20,
            }
        )
        return out
    state = method.init(pre)
    for i in range(n):
        records.clear()
        task = task_input(i)
        with measure(device) as u:
            state = method.step(state, task, pre)
        del task
        state_mb = (
            num_bytes(state.merged) + sum(h.numel() * h.element_size() for h in state.heads.values())
        ) / 2**20
        out["steps"].append(
            {
                "step": i + 1,
                "wall_s": u.wall_s,
                "peak_mb": u.peak_memory_mb,
                "state_mb": state_mb,
                "phases": {k[5:]: v for k, v in records.items() if k.startswith("time_")},
            }
        )
        print(
            f"  {spec['label']}: step {i + 1}/{n} {u.wall_s:.1f}s peak {u.peak_memory_mb:.0f} MB",
            file=sys.stderr,
            flush=True,
        )
    return out


def _eval_worker(spec: dict, torch, device, bb) -> dict:
    from otmf_exp.data.base import TensorTaskData

    n, bs, s = int(spec["eval_images"]), int(spec["eval_batch_size"]), bb.image_size
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, s, s, generator=g), torch.randint(0, 10, (n,), generator=g)
    data = TensorTaskData("bench", {"test": (x, y)}, [f"c{i}" for i in range(10)])
    head, pre = bb.zero_shot_head(data), bb.pretrained_state()
    on_device = [x[i : i + bs].to(device) for i in range(0, n, bs)]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    @torch.inference_mode()
    def raw():
        for xb in on_device:
            bb.module(pixel_values=xb)
        sync()

    def evaluate():
        bb.evaluate(pre, head, data, "test", bs)
        sync()

    def rate(fn) -> float:
        fn()  # warm-up
        best = float("inf")
        for _ in range(int(spec["repeats"])):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return n / best

    r_raw, r_eval = rate(raw), rate(evaluate)  # interleave once more to even out machine noise
    r_raw, r_eval = max(r_raw, rate(raw)), max(r_eval, rate(evaluate))
    return {"raw_per_s": r_raw, "evaluate_per_s": r_eval, "images": n, "batch_size": bs}


# ---------------------------------------------------------------------------------------------
# driver side
# ---------------------------------------------------------------------------------------------
def run_worker(spec: dict, log) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=None, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(
            f"error: benchmark worker {spec.get('label')} failed (exit {proc.returncode}); "
            f"rerun it alone: {shlex.join(cmd)}"
        )
    log(f"{spec.get('label', spec['kind'])}: {time.perf_counter() - t0:.0f}s")
    return json.loads(lines[-1][len(MARK) :])


def machine(device: str) -> dict:
    import psutil
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    if malloc:  # glibc allocator settings change what RSS shows; say so in the report
        info["malloc_env"] = malloc
    return info


def e2e(log) -> dict:
    """The default offline run, cold (empty cache: builds the digits8 zoo) then warm."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OTMF_EXP_CACHE=str(Path(tmp) / "cache"), HF_HUB_OFFLINE="1")
        for kind in ("cold", "warm"):
            run_dir = Path(tmp) / kind
            cmd = [sys.executable, "-m", "otmf_exp.run", f"hydra.run.dir={run_dir}", "progress=false"]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0 or not (run_dir / "metrics.json").is_file():
                raise SystemExit(
                    f"error: the default run failed ({kind}); run `python -m otmf_exp.run` to see why"
                )
            m = json.loads((run_dir / "metrics.json").read_text())
            out[kind] = {"wall_s": wall, "experiment_s": m["wall_time_s"], "acc": m["acc"]}
            log(f"e2e {kind}: {wall:.1f}s (ACC {m['acc']:.2f})")
    return out


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
        rows["state_growth_mb"] = (
            rows["steps"][-1]["state_mb"] - rows["steps"][1]["state_mb"] if len(rows["steps"]) > 1 else 0.0
        )
        worst = max(worst, rows["last_vs_step2"] or 0.0)
    if flat:
        r["flat_step_last_vs_step2"] = worst
    if "eval" in res:
        r["eval_vs_raw_forward"] = res["eval"]["evaluate_per_s"] / res["eval"]["raw_per_s"]
    if "e2e" in res:
        r["default_run_warm_s"] = res["e2e"]["warm"]["wall_s"]
    checks = {}
    for key, target in TARGETS.items():
        if key in r:
            ok = r[key] >= target if key == "eval_vs_raw_forward" else r[key] <= target
            checks[key] = {"value": r[key], "target": target, "met": ok}
    return {"ratios": r, "targets": checks}


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
    for part in ("eval", "e2e"):
        if part in new:
            old[part] = new[part]
    old["command"] = f"{old['command']}; then {new['command']}"
    old["date"] = f"{old['date']}; updated {new['date']}"
    return old


def _fmt(x, nd=2):
    return "—" if x is None else f"{x:.{nd}f}"


def render(res: dict) -> str:
    s = res["summary"]
    m = res["machine"]
    mem = "CUDA max allocated" if m["device"].startswith("cuda") else "peak RSS (5 ms sampler, whole process)"
    p = res["plan"]
    out = [
        "# Benchmarks",
        "",
        f"Generated by `{res['command']}` on {res['date']} ({'quick' if res['quick'] else 'full'} mode).",
        "",
        f"Machine: {m.get('gpu', m['cpu'])}, {m['cpu_cores']} CPU cores, {m['ram_gb']} GB RAM, torch {m['torch']}, "
        f"{m['torch_threads']} torch threads, device `{m['device']}`, autocast {res.get('autocast', 'float32')}, "
        f"{m['platform']}" + (f", glibc env {m['malloc_env']}" if m.get("malloc_env") else "") + ".",
        "",
        f"Model: CLIP image tower `{res['arch']}` (HF CLIPVisionModelWithProjection from its config, random "
        f"weights, {_fmt(res.get('model_mb', 0) * 2**20 / 4e6, 1)} M mergeable parameters), W = one copy of the mergeable weights = {_fmt(res.get('model_mb'), 0)} MB. Memory: {mem}. "
        f"Batch {p['batch_size']} per task per iteration; OTMF iterations = AdaMerging steps = "
        f"{p['iterations_step']} (step, ratio), {p['iterations_flat']} (flat, joint AdaMerging). Each row is a "
        "fresh process.",
        "",
        "## Targets",
        "",
        "| target | value | limit | met |",
        "|---|---|---|---|",
    ]
    names = {
        "otmf_vs_joint_adamerging_memory": "OTMF step peak memory / joint task-wise AdaMerging (8 tasks)",
        "flat_step_last_vs_step2": "worst continual method: peak memory at last step / step 2",
        "otmf_vs_continual_adamerging_time": "OTMF step time / continual AdaMerging step (equal iterations, batch)",
        "eval_vs_raw_forward": "evaluate throughput / raw forward throughput",
        "default_run_warm_s": "default offline run, warm (s)",
    }
    for key, c in s["targets"].items():
        op = "≥" if key == "eval_vs_raw_forward" else "≤"
        out.append(
            f"| {names[key]} | {_fmt(c['value'])} | {op} {c['target']} | {'yes' if c['met'] else '**no**'} |"
        )
    r = s["ratios"]
    extra = [
        ("otmf_vs_joint_adamerging_memory_above_baseline", "same, memory above the process baseline"),
        ("otmf_tensor_vs_joint_adamerging_memory", "OTMF with tensor-granularity masks / joint AdaMerging"),
        ("otmf_vs_joint_adamerging_per_task_memory", "OTMF / joint AdaMerging with per-task backward (ours)"),
        ("otmf_step_vs_joint_adamerging_time_per_iteration", "OTMF / joint AdaMerging time per iteration"),
    ]
    for key, label in extra:
        if key in r:
            out.append(f"| {label} | {_fmt(r[key])} | (info) | |")
    if "step" in res:
        out += [
            "",
            "## 1. One continual step per method",
            "",
            "Median over steps 2..T (step 1 copies τ₁ for every fusing method); peak = max over those steps; "
            "baseline = the process after loading θ₀ (before step 1); phases from `time_*` records.",
            "",
            "| method | step time (s) | peak (MB) | peak − baseline (MB) | (peak − baseline) / W | carried state (MB) | phases (s) |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, rows in res["step"].items():
            ph = rows["steps"][-1].get("phases") or {}
            phs = ", ".join(f"{k} {v:.1f}" for k, v in ph.items()) or "—"
            over = rows["peak_over_baseline_mb"]
            out.append(
                f"| {name} | {_fmt(rows['median_step_s'])} | {_fmt(rows['max_peak_mb'], 0)} | {_fmt(over, 0)} | "
                f"{_fmt(over / res['model_mb'], 1)} | {_fmt(rows['steps'][-1]['state_mb'], 0)} | {phs} |"
            )
    if "flat" in res:
        n = max(len(v["steps"]) for v in res["flat"].values())
        out += [
            "",
            f"## 2. Peak memory (MB) after each of {n} continual steps",
            "",
            "| method | step 2 | step 5 | step 10 | step 15 | last | last / step 2 | state growth 2→last (MB) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, rows in res["flat"].items():
            pk = {st["step"]: st["peak_mb"] for st in rows["steps"]}
            cells = [_fmt(pk.get(k), 0) for k in (2, 5, 10, 15)] + [_fmt(pk[max(pk)], 0)]
            out.append(
                f"| {name} | {' | '.join(cells)} | {_fmt(rows['last_vs_step2'], 3)} | {_fmt(rows['state_growth_mb'], 2)} |"
            )
        out += ["", "Per-step series: `flat` in the JSON file."]
    if "ratio" in res:
        out += [
            "",
            "## 3. OTMF step vs joint task-wise AdaMerging over 8 tasks",
            "",
            "| run | time (s) | iterations | peak (MB) | peak − baseline (MB) |",
            "|---|---|---|---|---|",
        ]
        for label, j in res["ratio"].items():
            st = j["steps"][0]
            out.append(
                f"| {label}, batch {p['batch_size']} per task | {_fmt(st['wall_s'])} | {p['iterations_flat']} | "
                f"{_fmt(st['peak_mb'], 0)} | {_fmt(st['peak_mb'] - j['baseline_mb'], 0)} |"
            )
        for name in ("otmf", "otmf (tensor masks)", "adamerging (task)"):
            if name in res.get("step", {}):
                rows = res["step"][name]
                out.append(
                    f"| {name} continual step, batch {p['batch_size']} | {_fmt(rows['median_step_s'])} | "
                    f"{p['iterations_step']} | {_fmt(rows['max_peak_mb'], 0)} | {_fmt(rows['peak_over_baseline_mb'], 0)} |"
                )
    if "eval" in res:
        e = res["eval"]
        out += [
            "",
            "## 4. Evaluation throughput",
            "",
            "| path | images/s |",
            "|---|---|",
            f"| raw forward (`module(pixel_values=x)`, batches already on the device) | {_fmt(e['raw_per_s'], 1)} |",
            f"| `Backbone.evaluate` (loader, transfer, functional_call, head, argmax) | {_fmt(e['evaluate_per_s'], 1)} |",
            "",
            f"{e['images']} images, batch {e['batch_size']}, best of {res['plan'].get('repeats', 3)} after a warm-up.",
        ]
    if "e2e" in res:
        e = res["e2e"]
        out += [
            "",
            "## 5. Default offline run (`python -m otmf_exp.run`)",
            "",
            "| cache | wall (s, incl. interpreter start) | experiment (s) | ACC |",
            "|---|---|---|---|",
            f"| cold (builds the digits8 zoo) | {_fmt(e['cold']['wall_s'], 1)} | {_fmt(e['cold']['experiment_s'], 1)} | {_fmt(e['cold']['acc'])} |",
            f"| warm | {_fmt(e['warm']['wall_s'], 1)} | {_fmt(e['warm']['experiment_s'], 1)} | {_fmt(e['warm']['acc'])} |",
        ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="fewer iterations (CPU-sized); same architecture and batch"
    )
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--out", default=str(ROOT), help="directory for BENCHMARKS.md and benchmarks.json")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument(
        "--arch", default="vit_b32", help="vit_b32 | vit_b16 | vit_l14 | tiny (tiny: smoke tests only)"
    )
    ap.add_argument("--steps", type=int, default=20, help="continual steps in the flatness part")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the table names")
    ap.add_argument(
        "--autocast", default="float32", help="float32 | bfloat16 | float16 forward passes (CUDA only)"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads in workers")
    ap.add_argument(
        "--live-rss",
        action="store_true",
        help="CPU: glibc returns freed tensors >= 1 MiB to the OS at once (MALLOC_MMAP_THRESHOLD_/"
        "MALLOC_TRIM_THRESHOLD_), so peak RSS tracks live memory instead of the allocator's high water",
    )
    ap.add_argument(
        "--merge",
        action="store_true",
        help="update benchmarks.json in --out with what this run measures (same machine and mode only)",
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(MARK + json.dumps(worker(spec)), flush=True)
        return 0

    if args.live_rss:  # read by run_worker (workers inherit the environment) and recorded by machine()
        os.environ.update(LIVE_RSS_ENV)
    import torch

    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        print(f"error: unknown part {bad[0]!r}; choose from {','.join(PARTS)}", file=sys.stderr)
        return 2
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available; use --device cpu", file=sys.stderr)
        return 2
    pl = plan(args.quick) | {"repeats": 2 if args.quick else 3}
    if args.autocast not in ("float32", "bfloat16", "float16"):
        print(
            f"error: --autocast must be float32, bfloat16 or float16, got {args.autocast!r}", file=sys.stderr
        )
        return 2
    base = {
        "arch": args.arch,
        "device": device,
        "threads": args.threads,
        "autocast": args.autocast,
        "eval_batch_size": pl["eval_batch_size"],
        "eval_images": pl["eval_images"],
        "repeats": pl["repeats"],
    }
    runs_step = method_runs(pl["iterations_step"], pl["otmf_eval_batches"])
    runs_flat = method_runs(pl["iterations_flat"], pl["otmf_eval_batches"])
    if args.methods:
        keep = [m.strip() for m in args.methods.split(",")]
        unknown = [m for m in keep if m not in runs_step]
        if unknown:
            print(
                f"error: unknown method {unknown[0]!r}; choose from {', '.join(runs_step)}", file=sys.stderr
            )
            return 2
        runs_step = {k: v for k, v in runs_step.items() if k in keep}
        runs_flat = {k: v for k, v in runs_flat.items() if k in keep}
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[bench {time.perf_counter() - t_start:6.0f}s] {msg}", file=sys.stderr, flush=True)

    res: dict = {
        "command": "python scripts/bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": args.quick,
        "arch": args.arch,
        "autocast": args.autocast,
        "plan": pl,
        "machine": machine(device),
    }
    if "step" in parts or "ratio" in parts:
        wanted = (
            runs_step
            if "step" in parts
            else {
                k: v
                for k, v in runs_step.items()
                if k in ("otmf", "otmf (tensor masks)", "adamerging (task)")
            }
        )
        res["step"] = {}
        for name, (method, ovr) in wanted.items():
            res["step"][name] = run_worker(
                base
                | {
                    "kind": "continual",
                    "label": f"step {name}",
                    "method": method,
                    "overrides": ovr,
                    "tasks": 3,
                },
                log,
            )
    if "flat" in parts:
        res["flat"] = {
            name: run_worker(
                base
                | {
                    "kind": "continual",
                    "label": f"flat {name}",
                    "method": method,
                    "overrides": ovr,
                    "tasks": args.steps,
                },
                log,
            )
            for name, (method, ovr) in runs_flat.items()
        }
    if "ratio" in parts:
        res["ratio"] = {
            label: run_worker(
                base
                | {
                    "kind": "joint",
                    "label": label,
                    "method": "adamerging",
                    "tasks": 8,
                    "overrides": {"granularity": "task", "steps": pl["iterations_flat"], "backward": mode},
                },
                log,
            )
            for label, mode in JOINT.items()
        }
    if "eval" in parts:
        res["eval"] = run_worker(base | {"kind": "eval", "label": "eval"}, log)
        res["model_mb"] = res["eval"]["model_mb"]
    if "e2e" in parts:
        res["e2e"] = e2e(log)
    for group in ("step", "flat", "ratio"):
        for rows in res.get(group, {}).values():
            res.setdefault("model_mb", rows["model_mb"])
    out = Path(args.out)
    if args.merge:
        res = merge_into(out / "benchmarks.json", res)
    res["summary"] = summarise(res)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "BENCHMARKS.md").write_text(render(res))
    log(f"wrote {out / 'BENCHMARKS.md'} and {out / 'benchmarks.json'}")
    for key, c in res["summary"]["targets"].items():
        print(f"{key}: {c['value']:.3f} (target {c['target']}) {'met' if c['met'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
