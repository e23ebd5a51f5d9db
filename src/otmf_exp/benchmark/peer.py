"""``bench-peer``: each shared method, ours beside FusionBench 0.2.33's class, interleaved, min of N.

For every row of :data:`~otmf_exp.benchmark.peer_methods.PEER` and every thread setting, ``repeats``
rounds each run both sides in a fresh process, back to back, the side that goes first alternating
from round to round, so that a load shift on a shared machine falls on both sides of a ratio. The
claim is the ratio of the per-side minima (time of the merge; peak RSS), not an absolute time.

Ours is the real runner (``python -m otmf_exp.run task_seq=synthetic backbone=synthetic``) whose
``steps.jsonl`` time excludes loading θ_t (continual: loaded before the timed step; joint: the lazy
stream's loading time subtracted); theirs is :mod:`otmf_exp.benchmark.peer_fb` with the pool's
``load_model`` time subtracted. Both merged models are saved in the first round and compared
(max |Δw| over the shared tensors), so a ratio is only claimed at equal results.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from otmf_exp.benchmark.peer_methods import PEER, PeerRow

Side = Callable[[str, PeerRow, Any, int, str | None], dict]


def schedule(rows: list[str], threads: list[Any], repeats: int) -> list[tuple[Any, int, str, str]]:
    """``(threads, round, row, side)`` in run order: per thread setting, per round, per row, both
    sides back to back; ours first in even rounds, theirs first in odd ones."""
    out = []
    for th in threads:
        for r in range(repeats):
            sides = ("ours", "fusionbench") if r % 2 == 0 else ("fusionbench", "ours")
            out += [(th, r, row, side) for row in rows for side in sides]
    return out


def best(runs: list[dict]) -> dict:
    """Min over rounds of merge time and of peak memory (each on its own: min of N)."""
    return {
        "merge_s": min(r["merge_s"] for r in runs),
        "peak_mb": min(r["peak_mb"] for r in runs),
        "n": len(runs),
        "threads": runs[0].get("threads"),
    }


def _key(k: str) -> str:
    return k.removeprefix("vision_model.")


def max_abs_diff(ours: dict, theirs: dict, skip: tuple[str, ...] = ()) -> float | None:
    """Max |Δw| over the tensors both merged models hold (keys compared without ``vision_model.``:
    ``CLIPVisionModel`` state dicts carry it in some transformers versions only), keys ending in one
    of ``skip`` left out."""
    theirs = {_key(k): v for k, v in theirs.items()}
    worst, shared = 0.0, 0
    for k, v in ours.items():
        w = None if k.endswith(skip) else theirs.get(_key(k))
        if w is None or w.shape != v.shape:
            continue
        shared += 1
        worst = max(worst, float((v.double() - w.double()).abs().max()))
    return worst if shared else None


def tabulate(raw: dict[str, dict[str, dict[str, list[dict]]]]) -> dict:
    """``raw[threads][row][side] = [runs]`` -> per threads and row: each side's best and the ratios."""
    table: dict = {}
    for th, rows in raw.items():
        table[th] = {}
        for row, sides in rows.items():
            if not sides.get("ours") or not sides.get("fusionbench"):
                continue
            o, f = best(sides["ours"]), best(sides["fusionbench"])
            table[th][row] = {
                "ours": o,
                "fusionbench": f,
                "time_ratio": o["merge_s"] / f["merge_s"] if f["merge_s"] > 0 else None,
                "peak_ratio": o["peak_mb"] / f["peak_mb"],
            }
    return table


def measure_peer(
    rows: list[str],
    threads: list[Any],
    repeats: int,
    run_side: Side,
    log: Callable[[str], None] = lambda m: None,
    on_run: Callable[[dict], None] = lambda raw: None,
) -> dict:
    """Run :func:`schedule` with ``run_side(side, row, threads, round, merged_to)`` (the first round
    saves both merged models and compares them); returns ``{raw, table, max_abs_diff}``."""
    from safetensors.torch import load_file

    raw: dict = {str(th): {row: {"ours": [], "fusionbench": []} for row in rows} for th in threads}
    diffs: dict[str, float | None] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for th, r, row, side in schedule(rows, threads, repeats):
            merged_to = str(Path(tmp) / f"{row}.{side}.safetensors") if r == 0 and th == threads[0] else None
            got = run_side(side, PEER[row], th, r, merged_to)
            raw[str(th)][row][side].append(got | {"round": r})
            log(f"peer threads={th} round {r} {row} {side}: {got['merge_s']:.2f}s {got['peak_mb']:.0f} MB")
            on_run(raw)
            if merged_to and side == ("fusionbench" if r % 2 == 0 else "ours"):  # both sides done
                files = {s: Path(tmp) / f"{row}.{s}.safetensors" for s in ("ours", "fusionbench")}
                if all(f.is_file() for f in files.values()):
                    ours, theirs = (load_file(files[s]) for s in ("ours", "fusionbench"))
                    diffs[row] = max_abs_diff(ours, theirs, PEER[row].skip)
    return {"raw": raw, "table": tabulate(raw), "max_abs_diff": diffs}


def export_models(
    fb_python: str, arch: str, tasks: int, root: Path, log: Callable[[str], None], rows: list[str] = ()
) -> None:
    """θ₀ and θ_t saved once for FusionBench's pool (outside every timed run), and for the data-driven
    ``rows`` the batches our method draws and the synthetic heads (:mod:`peer_data`)."""
    import shutil

    from otmf_exp.benchmark.peer_data import HEADS, write_batches, write_heads
    from otmf_exp.benchmark.peer_fb import write_weights
    from otmf_exp.benchmark.runs import _run_reference

    weights = root.with_name(root.name + ".weights")
    write_weights(arch, tasks, weights)
    spec = {"arch": arch, "tasks": tasks, "weights": str(weights), "dir": str(root), "label": "peer export"}
    _run_reference("otmf_exp.benchmark.peer_fb", "FusionBench model export", spec, fb_python, log, "export")
    shutil.rmtree(weights)
    data_rows = [n for n in rows if PEER[n].data]
    if data_rows:  # the batches each data-driven row's method draws, and the heads, for theirs
        write_heads(arch, tasks, root / HEADS)
        for n in data_rows:
            got = write_batches(
                arch, tasks, PEER[n].method, PEER[n].overrides, root / f"{n}.batches.safetensors"
            )
            log(f"peer {n}: {got} batches saved for FusionBench's side")


def auto_threads(python: str) -> int:
    """torch's default thread count in a fresh ``python`` (``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` of
    this process removed: they would pass on to the child and make "auto" whatever the caller set)."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    cmd = [python, "-c", "import torch; print(torch.get_num_threads())"]
    return int(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.split()[-1])


def side_runner(
    fb_python: str, models: Path, base: dict, log: Callable[[str], None] = lambda m: None
) -> Side:
    """``run_side`` for :func:`measure_peer`: ours through the runner, theirs through ``peer_fb``.
    ``base`` carries arch, tasks, device and eval_batch_size; ``threads`` "auto" = torch's default count
    in a fresh process of each side's Python (:func:`auto_threads`, set explicitly, recorded)."""
    import sys

    from otmf_exp.benchmark.runs import _run_reference, run_method

    auto: dict[str, int] = {}

    def run_side(side: str, row: PeerRow, threads: Any, rnd: int, merged_to: str | None) -> dict:
        py = fb_python if side == "fusionbench" else sys.executable
        if threads == "auto" and py not in auto:
            auto[py] = auto_threads(py)
        th = auto[py] if threads == "auto" else int(threads)
        name = next(k for k, v in PEER.items() if v is row)
        label = f"peer {name} {side} threads={threads} round {rnd}"
        if side == "fusionbench":
            spec = {"row": name, "dir": str(models), "threads": th, "merged_to": merged_to, "label": label}
            got = _run_reference(
                "otmf_exp.benchmark.peer_fb", "FusionBench peer", spec, fb_python, log, "run"
            )
            return {k: got[k] for k in ("merge_s", "peak_mb", "baseline_mb", "load_s", "threads")}
        spec = base | {
            "kind": row.protocol,
            "method": row.method,
            "overrides": row.overrides | {"/threads": th},
            "threads": th,
            "label": label,
            "merged_to": merged_to,
        }
        got = run_method(spec, log)
        return {
            "merge_s": sum(s["wall_s"] for s in got["steps"]),
            "peak_mb": max(s["peak_mb"] for s in got["steps"]),
            "baseline_mb": got["baseline_mb"],
            "threads": th,
        }

    return run_side
