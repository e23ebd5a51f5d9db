"""Our side of the AdaMerging comparisons (README "AdaMerging as each compared paper ran it"): runs ``method=adamerging`` with a
reference's constants on the first tasks of digits8 through the Python API and saves, per case, the
coefficients after every Adam step, the merged vector of every step, the final accuracies, the batches
each stream served and the batch plans the reference scripts are fed (data plumbing only).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/compare/adamerging_ours.py OUT_DIR [--cases a,b]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from omegaconf import OmegaConf

from otmf_exp.data.digits import build_task
from otmf_exp.merging.adamerging import adamerging as am
from otmf_exp.merging.adamerging.adamerging import AdaMerging, AdaMergingConfig
from otmf_exp.merging.base import MethodContext, TaskInput
from otmf_exp.models.tiny import TinyBackbone
from otmf_exp.offline.zoo import DigitsZoo, suite_tasks

TASK = {"init": 0.2, "lr": 0.01, "clamp": "merge", "stream": "per_task_cycle", "backward": "summed"}
LAYER = {
    "granularity": "layer",
    "batch_size": 4,
    "clamp": "merge",
    "stream": "per_step_cycle",
    "backward": "summed",
}
CADA = {
    "continual": "current_only", "granularity": "layer", "lr": 1e-4, "clamp": "merge",
    "seed_samples": 5, "entropy_eps": 1e-8,
}  # fmt: skip
#: case -> (reference, our options); the references' step counts (the OTMF scripts hard-code 100), 4 tasks
CASES = {
    "task": ("otmf_task", TASK),
    "task_binds": ("otmf_task", {**TASK, "init": 0.9, "lr": 0.02}),
    "task_none_binds": ("otmf_task", {**TASK, "init": 0.9, "lr": 0.02, "clamp": "none"}),
    "task_project_binds": ("otmf_task", {**TASK, "init": 0.9, "lr": 0.02, "clamp": "project"}),
    "layer": ("otmf_layer", LAYER),
    "layer_binds": ("otmf_layer", {**LAYER, "init": 0.9, "lr": 0.05}),
    "c_adamerging": ("mingle", CADA),
    "c_adamerging_binds": ("mingle", {**CADA, "init": 0.9, "lr": 0.05}),
}
STEPS, N_TASKS = {"otmf_task": 100, "otmf_layer": 100, "mingle": 50}, 4


def run_case(bb, pre, tasks, opts, steps):
    cfg = OmegaConf.merge(OmegaConf.structured(AdaMergingConfig), {"steps": steps, **opts})
    AdaMerging.validate(cfg)
    ctx = MethodContext(bb, torch.device("cpu"), torch.Generator(), progress=False, seed=0)
    m = AdaMerging(cfg, ctx)
    m.trace = []
    consumed: list[list[tuple[str, torch.Tensor]]] = []
    pools: dict[str, object] = {}
    real = am.batch_streams

    def logged(cfg_, ctx_, datas, key, skips):
        log = []
        consumed.append(log)
        for d in datas:
            pools[d.name] = d

        def wrap(name, it):
            for b in it:
                log.append((name, b["inputs"]))
                yield b

        return [wrap(d.name, s) for d, s in zip(datas, real(cfg_, ctx_, datas, key, skips))]

    am.batch_streams = logged
    try:
        state, prev, per_step = m.init(pre), None, []
        for i, (name, data, head, weights) in enumerate(tasks):
            t = TaskInput(name, i, weights, head, data, previous_data=prev)
            state, prev = m.step(state, t, pre), data
            per_step.append({k: v.clone() for k, v in state.merged.items()})
    finally:
        am.batch_streams = real
    merged = {k: pre[k] + state.merged[k] for k in pre}
    acc = {name: bb.evaluate(merged, head, data, "test", 256) for name, data, head, _ in tasks}
    return m, cfg, ctx, consumed, pools, merged, per_step, acc


def plans(cfg, ctx, pools, order):
    """The batches the reference's own loaders are fed: first passes to cycle (the OTMF authors'
    scripts) or the epochs of a reshuffling loader and the seed samples (MINGLE)."""

    def first_pass(d, seed):
        return [b["inputs"] for b in d.loader("test", cfg.batch_size, shuffle=True, seed=seed)]

    if cfg.stream == "per_task_cycle":
        return {n: first_pass(pools[n], ctx.seed_for("adamerging", "stream", n)) for n in order}
    if cfg.stream == "per_step_cycle":  # step t (1-based, t >= 2): pool 0 = current, pool 1 = previous
        return {
            (t, order[t - 1 - j]): first_pass(pools[order[t - 1 - j]], ctx.seed_for("adamerging", t, j))
            for t in range(2, len(order) + 1)
            for j in (0, 1)
        }
    out = {}
    for t, n in enumerate(order, start=1):
        d, seed = pools[n], ctx.seed_for("adamerging", t, 0)
        per_epoch = -(-d.size("test") // cfg.batch_size)
        epochs = [first_pass(d, seed + e) for e in range(-(-cfg.steps // per_epoch) + 1)]
        out[n] = {"epochs": epochs, "seeds": [b["inputs"] for b in d.loader("test", 10**6)]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    zoo = DigitsZoo(progress=False)
    bb = TinyBackbone(zoo)
    pre = bb.pretrained_state()
    order = suite_tasks()[:N_TASKS]
    tasks = []
    for name in order:
        data = build_task(name)
        tasks.append((name, data, bb.zero_shot_head(data), bb.load_finetuned(name)))
    for case in args.cases.split(","):
        ref, opts = CASES[case]
        m, cfg, ctx, consumed, pools, merged, per_step, acc = run_case(bb, pre, tasks, opts, STEPS[ref])
        torch.save(
            {
                "reference": ref,
                "options": dict(opts),
                "steps": STEPS[ref],
                "test": {n: d.splits["test"] for n, d, _, _ in tasks},
                "order": order,
                "trace": m.trace,
                "merged": merged,
                "per_step": per_step,
                "acc": acc,
                "consumed": consumed,
                "plans": plans(cfg, ctx, pools, order),
                "mergeable": list(pre),
            },
            args.out / f"{case}.pt",
        )
        print(case, {k: round(v, 2) for k, v in acc.items()})


if __name__ == "__main__":
    main()
