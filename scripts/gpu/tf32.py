#!/usr/bin/env python
"""OTMF at matmul_precision=highest vs medium (the authors' TF32) on the same synthetic tower and tasks:
merge time per step, the merged weights' max |Δ| and the mask statistics' max |Δ| after each step.

    python scripts/gpu/tf32.py --out DIR [--device cuda] [--arch vit_b32] [--iterations 100] [--tasks 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def run(out: Path, precision: str, a: argparse.Namespace) -> list[dict]:
    tasks = ",".join(f"task{i:02d}" for i in range(a.tasks))
    cmd = [
        sys.executable,
        "-m",
        "otmf_exp.run",
        "task_seq=synthetic",
        f"backbone.arch={a.arch}",
        f"task_seq.tasks=[{tasks}]",
        "eval_split=validation",
        "eval_individual=false",
        f"device={a.device}",
        "method=otmf",
        f"method.iterations={a.iterations}",
        f"matmul_precision={precision}",
        "save_merged=true",
        "keep_checkpoints=none",
        "progress=false",
        f"out_dir={out}",
    ]
    subprocess.run(cmd, check=True)
    return [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--arch", default="vit_b32")
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--tasks", type=int, default=2)
    a = ap.parse_args()
    from safetensors.torch import load_file

    out = Path(a.out)
    steps = {p: run(out / p, p, a) for p in ("highest", "medium")}
    w = {p: load_file(str(out / p / "merged.safetensors")) for p in steps}
    res = {
        "settings": vars(a),
        "time_s": {p: [s["time_s"] for s in v] for p, v in steps.items()},
        "peak_memory_mb": {p: [s["peak_memory_mb"] for s in v] for p, v in steps.items()},
        "merged_max_abs_diff": max(
            float((w["highest"][k] - w["medium"][k]).abs().max()) for k in w["highest"]
        ),
        "mask_quantiles": {p: [s.get("mask_quantiles") for s in v] for p, v in steps.items()},
        "acc": {p: [s["avg_acc"] for s in v] for p, v in steps.items()},
    }
    (out / "tf32.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: res[k] for k in ("time_s", "merged_max_abs_diff", "acc")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
