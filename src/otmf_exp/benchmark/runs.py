"""Benchmark measurements, each in a fresh process: method runs through the real runner (``python -m
otmf_exp.run`` on the synthetic stand-ins), the evaluation-throughput worker, and the default run.

A method run is exactly what a user runs — ``Experiment`` with its continual (or joint) loop,
checkpoints off — on ``task_seq=synthetic`` (random 224² images, θ_t = θ₀ + seeded noise) and
``backbone=synthetic`` (the real HF CLIP image tower of ``arch``, random weights). Time, peak
memory, carried-state size and phase times are the runner's own records (``steps.jsonl``,
``metrics.json``). Evaluation after each step uses a 2-image validation split so that it stays
cheap; it is outside the measured merge time and memory, as in every run.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from otmf_exp.benchmark.throughput import MARK

#: images per task in the validation split evaluated after every step (kept tiny: not what we time)
EVAL_IMAGES = 2


def run_overrides(spec: dict, out_dir: Path) -> list[str]:
    """The ``python -m otmf_exp.run`` overrides of one measured run."""
    tasks = ",".join(f"task{i:02d}" for i in range(int(spec["tasks"])))
    ovr = [
        "task_seq=synthetic",
        f"backbone.arch={spec['arch']}",
        f"backbone.autocast={spec.get('autocast', 'float32')}",
        f"backbone.batch_size={spec['eval_batch_size']}",
        f"task_seq.tasks=[{tasks}]",
        f"task_seq.split_sizes.validation={EVAL_IMAGES}",
        "eval_split=validation",
        "eval_individual=false",
        f"method={spec['method']}",
        f"protocol={spec['kind']}",
        f"device={spec['device']}",
        "keep_checkpoints=none",
        "progress=false",
        f"out_dir={out_dir}",
    ]
    if spec.get("merged_to"):
        ovr.append("save_merged=true")
    # a key starting with "/" is a top-level override (e.g. "/matmul_precision"), the rest are method.*
    return ovr + [
        f"{k[1:]}={v}" if k.startswith("/") else f"method.{k}={v}" for k, v in spec["overrides"].items()
    ]


def _env(spec: dict) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(spec["threads"])
    return env


def run_method(spec: dict, log: Callable[[str], None]) -> dict:
    """One measured run; returns ``{model_mb, baseline_mb, memory_kind, steps: [{step, wall_s,
    peak_mb, state_mb, phases}]}`` from the run's own outputs."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "otmf_exp.run", *run_overrides(spec, out)]
        t0 = time.perf_counter()
        proc = subprocess.run(
            cmd, env=_env(spec), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        if proc.returncode != 0 or not (out / "metrics.json").is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise SystemExit(
                f"error: benchmark run {spec.get('label')} failed ({last}); rerun it: {shlex.join(cmd)}"
            )
        m = json.loads((out / "metrics.json").read_text())
        records = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
        if spec.get("merged_to"):
            shutil.copy2(out / "merged.safetensors", spec["merged_to"])
    steps = [
        {
            "step": r["step"],
            "wall_s": r["time_s"],
            "peak_mb": r["peak_memory_mb"],
            "start_mb": r.get("start_memory_mb"),
            "state_mb": r["state_mb"],
            "phases": {k[5:]: v for k, v in r.items() if k.startswith("time_") and k != "time_s"},
        }
        for r in records
    ]
    log(f"{spec.get('label')}: {time.perf_counter() - t0:.0f}s")
    return {
        "model_mb": m["model_mb"],
        "baseline_mb": m["baseline_memory_mb"],
        "memory_kind": m["memory_kind"],
        "state_growth": m["state_growth"],
        "declared_growth_mb_per_task": m.get("state_growth_mb_per_task"),
        "steps": steps,
    }


def _run_reference(
    module: str, what: str, spec: dict, python: str, log: Callable[[str], None], *verb: str
) -> dict:
    """``python -m module [VERB] SPEC`` in a reference's own env (this package on its path); the result
    is its last ``MARK`` line. A failed run ends the bench with one line naming the command."""
    import otmf_exp

    env = _env(spec)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(otmf_exp.__file__).parents[1]), env.get("PYTHONPATH", "")])
    cmd = [python, "-m", module, *verb, json.dumps(spec)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"error: the {what} run failed ({last}); rerun it: {shlex.join(cmd)}")
    log(f"{spec.get('label', what)}: {time.perf_counter() - t0:.0f}s")
    return json.loads(lines[-1][len(MARK) :])


def run_fusionbench(spec: dict, python: str, log: Callable[[str], None]) -> dict:
    """FusionBench's own OPCM on the same synthetic towers, with ``python`` (an env with fusion-bench)."""
    return _run_reference("otmf_exp.benchmark.fusionbench", "FusionBench OPCM", spec, python, log)


def run_authors(spec: dict, python: str, log: Callable[[str], None]) -> dict:
    """The OTMF authors' compute_sr_mask (``otmf_exp.benchmark.authors``) with ``python`` (their env)."""
    return _run_reference("otmf_exp.benchmark.authors", "authors' OTMF", spec, python, log)


def run_throughput(spec: dict, log: Callable[[str], None]) -> dict:
    """The evaluation-throughput worker in a fresh process."""
    cmd = [sys.executable, "-m", "otmf_exp.benchmark.throughput", json.dumps(spec)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(spec), stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(
            f"error: the throughput worker failed (exit {proc.returncode}); rerun it: {shlex.join(cmd)}"
        )
    log(f"eval: {time.perf_counter() - t0:.0f}s")
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
