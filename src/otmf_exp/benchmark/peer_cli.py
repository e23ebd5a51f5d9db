"""``scripts/bench.py --peer`` (``make bench-peer``): the peer table into benchmarks.json and BENCHMARKS.md."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from otmf_exp.benchmark.peer import export_models, measure_peer, side_runner
from otmf_exp.benchmark.peer_methods import PEER

#: sizes: full = ViT-B/32 (12 blocks), quick = ViT-B/32's widths with 4 blocks; 8 tasks, min of 3 both
SIZES = {"full": {"arch": "vit_b32", "tasks": 8}, "quick": {"arch": "vit_b32_l4", "tasks": 8}}
REPEATS = 3
MISSING = "error: no FusionBench Python at {py}; run make parity-venv first"


def check_python(py: str | None) -> str | None:
    """The one-line error for a missing or broken FusionBench Python, or None when it is usable."""
    if not py or not (Path(py).is_file() and os.access(py, os.X_OK)):
        return MISSING.format(py=py or "(none given: --fusionbench-python)")
    return None


def rows_and_threads(methods: str | None, threads: str) -> tuple[list[str], list]:
    """The asked peer rows and thread settings, or ``ValueError`` with one line."""
    rows = [m.strip() for m in methods.split(",")] if methods else list(PEER)
    bad = [r for r in rows if r not in PEER]
    if bad:
        raise ValueError(f"unknown peer method {bad[0]!r}; choose from {', '.join(PEER)}")
    out: list = []
    for t in (x.strip() for x in threads.split(",")):
        if t != "auto" and not (t.isdigit() and int(t) >= 1):
            raise ValueError(f"--peer-threads takes positive integers or auto, got {t!r}")
        out.append(t if t == "auto" else int(t))
    return rows, out


def keep_other_threads(old: dict | None, new: dict) -> dict:
    """``new`` plus the thread settings of an earlier peer result of the same size and machine that
    this run did not measure (``--peer-threads 1`` then ``--peer-threads auto`` make one table)."""
    same = old and old.get("quick") == new["quick"] and old.get("arch") == new["arch"]
    same = same and old.get("machine", {}).get("cpu_cores") == new["machine"]["cpu_cores"]
    if not same:
        return new
    merged = dict(new)
    for key in ("table", "raw"):
        merged[key] = {**{k: v for k, v in old[key].items() if k not in new[key]}, **new[key]}
    merged["threads"] = sorted(set(old["threads"]) | set(new["threads"]))
    if old["command"] != new["command"]:
        merged["command"] = f"{old['command']}; then {new['command']}"
    merged["max_abs_diff"] = {**old.get("max_abs_diff", {}), **new["max_abs_diff"]}
    return merged


def parity_bounds(path: Path) -> dict[str, float]:
    """Each peer row's bound from ``parity.json`` (the float32 row of the same name), {} without it."""
    if not path.is_file():
        return {}
    rows = {r["name"]: r for r in json.loads(path.read_text()).get("rows", [])}
    return {n: float(rows[n]["bound"]) for n in PEER if n in rows and rows[n].get("bound") is not None}


def main_peer(args: argparse.Namespace, argv: list[str], root: Path) -> int:
    from otmf_exp.benchmark.markdown import render, scrub
    from otmf_exp.benchmark.report import summarise
    from otmf_exp.benchmark.runs import machine
    from otmf_exp.benchmark.suite import model_mb

    err = check_python(args.fusionbench_python)
    if err:
        print(err, file=sys.stderr)
        return 2
    try:
        rows, threads = rows_and_threads(args.peer_methods, args.peer_threads)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = SIZES["quick" if args.quick else "full"]
    repeats = args.repeats or REPEATS
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[bench-peer {time.perf_counter() - t_start:6.0f}s] {msg}", file=sys.stderr, flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "benchmarks.peer.partial.json"
    base = size | {"device": "cpu", "eval_batch_size": 16, "autocast": "float32"}
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        log(f"exporting {size['tasks'] + 1} {size['arch']} checkpoints for FusionBench's pool")
        export_models(args.fusionbench_python, size["arch"], size["tasks"], models, log, rows)
        peer = measure_peer(
            rows,
            threads,
            repeats,
            side_runner(args.fusionbench_python, models, base, log),
            log,
            lambda raw: partial.write_text(json.dumps({"raw": raw}, indent=1) + "\n"),
        )
    partial.unlink(missing_ok=True)
    peer |= {
        "command": scrub("python scripts/bench.py " + " ".join(argv)),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": bool(args.quick),
        "repeats": repeats,
        "threads": [str(t) for t in threads],
        "machine": machine("cpu"),
        "parity_bound": parity_bounds(root / "parity.json"),
        **size,
    }
    path = out / "benchmarks.json"
    res = json.loads(path.read_text()) if path.is_file() else {}
    res["peer"] = keep_other_threads(res.get("peer"), peer)
    path.write_text(json.dumps(res, indent=1) + "\n")
    if "machine" in res and "plan" in res:  # a full benchmark result: BENCHMARKS.md from all of it
        res["summary"] = summarise(res)
        others = {}  # as scripts/bench.py: results kept from other machines, benchmarks/<name>/
        for f in sorted((out / "benchmarks").glob("*/benchmarks.json")):
            other = json.loads(f.read_text())
            other["summary"] = summarise(other)
            other.setdefault("model_mb", model_mb(other))
            others[f.parent.name] = other
        text = render(res, others)
    else:
        text = render({"peer": res["peer"]}, peer_only=True)
    (out / "BENCHMARKS.md").write_text(text)
    log(f"wrote {out / 'BENCHMARKS.md'} and {path}")
    for th, table in peer["table"].items():
        for row, r in table.items():
            print(
                f"threads={th} {row}: time {r['time_ratio']:.3f}x, peak {r['peak_ratio']:.3f}x of FusionBench"
            )
    return 0
