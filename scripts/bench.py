"""Time and memory of every merging method on the real ViT-B/32 architecture; writes BENCHMARKS.md + JSON.

    python scripts/bench.py                  # full: paper iterations (OTMF 100, AdaMerging 100 = equal)
    python scripts/bench.py --quick          # CPU-sized: fewer iterations, same architecture and batch
    python scripts/bench.py --only flat,ratio --out /tmp/bench

Every method measurement is a real run of the runner (``python -m otmf_exp.run task_seq=synthetic
backbone.arch=ARCH method=...``) in its own fresh process, so one method's allocator state never
leaks into another's numbers; time, memory (CUDA max allocated on GPU, sampled peak RSS on CPU),
carried-state size and phase times are the run's own steps.jsonl / metrics.json records:

  step   per continual step of each method: wall time, peak memory, phase times, carried-state size
  flat   peak memory after each of ``--steps`` (20) continual steps of every continual method
  ratio  OTMF step vs joint task-wise AdaMerging over 8 tasks at equal batch (memory, time), and
         OTMF step vs continual AdaMerging step at equal iterations and batch (time)
  eval   Backbone.evaluate throughput vs a raw forward pass of the same module on the same images
  e2e    the offline default run (``python -m otmf_exp.run``) end to end, cold cache and warm

Models: ``backbone=synthetic`` (``otmf_exp.offline.synthetic``) -- CLIPVisionModelWithProjection built
from ViT-B/32's config with random weights (87.5 M mergeable parameters), θ_t = θ₀ + seeded noise,
random 224×224 images. The measuring code lives in ``otmf_exp.benchmark``; this is its CLI.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from otmf_exp.benchmark.markdown import render, scrub
from otmf_exp.benchmark.plan import LEVER_ROWS, LIVE_RSS_ENV, PARTS, method_runs, plan
from otmf_exp.benchmark.report import merge_into, summarise
from otmf_exp.benchmark.runs import machine
from otmf_exp.benchmark.suite import measure, model_mb

ROOT = Path(__file__).resolve().parents[1]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="fewer iterations (CPU-sized); same architecture and batch"
    )
    ap.add_argument(
        "--only",
        default=None,
        help=f"comma-separated subset of {','.join(PARTS)} (default: all; authors only with --authors-python)",
    )
    ap.add_argument("--out", default=str(ROOT), help="directory for BENCHMARKS.md and benchmarks.json")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument(
        "--arch", default="vit_b32", help="vit_b32 | vit_b16 | vit_l14 | tiny (tiny: smoke tests only)"
    )
    ap.add_argument("--steps", type=int, default=20, help="continual steps in the flatness part")
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="repeats of the eval timing and rounds of the authors part (default: 2 quick, 3 full)",
    )
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
    ap.add_argument(
        "--fusionbench-python",
        default=None,
        help="opcm part: a Python with fusion-bench==0.2.33 installed, to run FusionBench's own OPCM on the "
        "same towers (e.g. a venv made with `pip install fusion-bench==0.2.33 'transformers<5' 'datasets<4'`)",
    )
    ap.add_argument(
        "--peer",
        action="store_true",
        help="only the peer table: every shared method, ours beside FusionBench's class (needs "
        "--fusionbench-python); merged into benchmarks.json and BENCHMARKS.md in --out",
    )
    ap.add_argument("--peer-methods", default=None, help="comma-separated subset of the peer rows")
    ap.add_argument("--peer-threads", default="1,auto", help="thread settings of the peer table")
    ap.add_argument(
        "--authors-python",
        default=None,
        help="authors part: a Python that can import the OTMF authors' checkout (--authors-repo) and "
        "matplotlib beside torch and geomloss (README 'Performance and memory')",
    )
    ap.add_argument(
        "--authors-repo", default=None, help="authors part: a checkout of GitHub 37ETs/OT_fusion (read only)"
    )
    return ap


class _BadArgs(Exception):
    pass


def _check(args: argparse.Namespace) -> tuple[list[str], str]:
    """The parts and the device, or one-line ``_BadArgs``."""
    import torch

    only = args.only or ",".join(p for p in PARTS if p != "authors" or args.authors_python)
    parts = [p.strip() for p in only.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise _BadArgs(f"unknown part {bad[0]!r}; choose from {','.join(PARTS)}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise _BadArgs("--device cuda but CUDA is not available; use --device cpu")
    if args.autocast not in ("float32", "bfloat16", "float16"):
        raise _BadArgs(f"--autocast must be float32, bfloat16 or float16, got {args.autocast!r}")
    fb = args.fusionbench_python
    if fb and not (Path(fb).is_file() and os.access(fb, os.X_OK)):
        raise _BadArgs(f"--fusionbench-python {fb} is not an executable file")
    if "authors" in parts:
        if not (args.authors_python and Path(args.authors_python).is_file()):
            raise _BadArgs("the authors part needs --authors-python (an executable) and --authors-repo")
        if not (args.authors_repo and (Path(args.authors_repo) / "src" / "tasks").is_dir()):
            raise _BadArgs(f"--authors-repo {args.authors_repo} is not a checkout of 37ETs/OT_fusion")
    return parts, device


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.peer:
        from otmf_exp.benchmark.peer_cli import main_peer

        return main_peer(args, argv if argv is not None else sys.argv[1:], ROOT)
    if args.live_rss:  # read by the measured runs (they inherit the environment) and recorded by machine()
        os.environ.update(LIVE_RSS_ENV)
    try:
        parts, device = _check(args)
    except _BadArgs as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pl = plan(args.quick) | {"repeats": args.repeats or (2 if args.quick else 3)}
    base = {
        "arch": args.arch,
        "device": device,
        "threads": args.threads,
        "autocast": args.autocast,
        "eval_batch_size": pl["eval_batch_size"],
        "eval_images": pl["eval_images"],
        "repeats": pl["repeats"],
    }
    runs_step = method_runs(pl["iterations_step"])
    runs_flat = method_runs(pl["iterations_flat"])
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
    else:
        runs_flat = {k: v for k, v in runs_flat.items() if k not in LEVER_ROWS}
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[bench {time.perf_counter() - t_start:6.0f}s] {msg}", file=sys.stderr, flush=True)

    res: dict = {
        # absolute paths as PATH: benchmarks.json holds no machine's paths either
        "command": scrub("python scripts/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": args.quick,
        "arch": args.arch,
        "autocast": args.autocast,
        "plan": pl,
        "machine": machine(device),
    }
    partial = Path(args.out) / "benchmarks.partial.json"

    def save_partial(done: dict) -> None:
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(res | done, indent=1) + "\n")

    res |= measure(
        parts,
        base,
        pl,
        runs_step,
        runs_flat,
        args.steps,
        log,
        args.fusionbench_python,
        save_partial,
        authors=(args.authors_python, args.authors_repo) if "authors" in parts else None,
    )
    partial.unlink(missing_ok=True)
    if model_mb(res) is not None:
        res["model_mb"] = model_mb(res)
    out = Path(args.out)
    if args.merge:
        res = merge_into(out / "benchmarks.json", res)
    res["summary"] = summarise(res)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks.json").write_text(json.dumps(res, indent=1) + "\n")
    others = {}  # results kept from other machines (a GPU run): benchmarks/<name>/benchmarks.json
    for f in sorted((out / "benchmarks").glob("*/benchmarks.json")):
        other = json.loads(f.read_text())
        other["summary"] = summarise(other)
        other.setdefault("model_mb", model_mb(other))
        others[f.parent.name] = other
    (out / "BENCHMARKS.md").write_text(render(res, others))
    log(f"wrote {out / 'BENCHMARKS.md'} and {out / 'benchmarks.json'}")
    for key, c in res["summary"]["targets"].items():
        print(f"{key}: {c['value']:.3f} (target {c['target']}) {'met' if c['met'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
