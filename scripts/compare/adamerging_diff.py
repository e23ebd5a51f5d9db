"""Max differences between our AdaMerging and a reference run on the same case (both saved .pt):
coefficients after every Adam step, τᵐ after every step, final merged weights, accuracies, and
whether both consumed the same batches in the same order.

    python scripts/compare/adamerging_diff.py OURS_DIR REF_DIR [--cases a,b]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def diff(ours: dict, ref: dict) -> dict:
    t_o, t_r = ours["trace"], ref["trace"]
    n = min(len(t_o), len(t_r))
    coef = max(float((a.reshape(b.shape) - b).abs().max()) for a, b in zip(t_o[:n], t_r[:n]))
    first = next(
        (i for i, (a, b) in enumerate(zip(t_o, t_r)) if float((a.reshape(b.shape) - b).abs().max()) > 1e-5),
        None,
    )
    o_steps = ours["per_step"][-len(ref["per_step"]) :]
    tau = max(float((a[k] - b[k]).abs().max()) for a, b in zip(o_steps, ref["per_step"]) for k in b)
    w = max(float((ours["merged"][k] - ref["merged"][k]).abs().max()) for k in ref["merged"])
    acc = max(abs(ours["acc"][k] - ref["acc"][k]) for k in ref["acc"])
    o_b = [(name, x) for log in ours["consumed"] for name, x in log]
    same = len(o_b) == len(ref["consumed"]) and all(
        a[0] == b[0] and torch.equal(a[1], b[1])
        for a, b in zip(sorted_by_step(o_b), sorted_by_step(ref["consumed"]))
    )
    return {
        "adam_steps": f"{len(t_o)}/{len(t_r)}",
        "max|Δλ|": coef,
        "first step |Δλ|>1e-5": first,
        "max|Δτᵐ| (every step)": tau,
        "max|Δθ|": w,
        "max|Δacc| (pp)": acc,
        "same batches": same,
        "λ range (ours)": (float(min(t.min() for t in t_o)), float(max(t.max() for t in t_o))),
    }


def sorted_by_step(batches: list) -> list:
    """Per task, the batches in the order drawn (pool order inside a step differs: ours current
    first, theirs previous first; it does not change a two-term sum)."""
    return sorted(batches, key=lambda b: b[0]) if batches else batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ours", type=Path)
    ap.add_argument("ref", type=Path)
    ap.add_argument("--cases", default=None)
    args = ap.parse_args()
    names = args.cases.split(",") if args.cases else sorted(p.stem for p in args.ref.glob("*.pt"))
    for name in names:
        ours = torch.load(args.ours / f"{name}.pt", weights_only=False)
        ref = torch.load(args.ref / f"{name}.pt", weights_only=False)
        d = diff(ours, ref)
        print(name, " ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items()))


if __name__ == "__main__":
    main()
