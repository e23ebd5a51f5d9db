"""FusionBench 0.2.33's own algorithm classes on the bench's synthetic towers: the other side of ``bench-peer``.

Run with a Python that has ``fusion-bench==0.2.33`` (and ``transformers<5``), this package on its path:

    FB_PY -m otmf_exp.benchmark.peer_fb export '{"arch": "vit_b32", "tasks": 8, "weights": "W", "dir": "MODELS"}'
    FB_PY -m otmf_exp.benchmark.peer_fb run '{"row": "ties", "dir": "MODELS", "merged_to": "OUT"}'

``export`` writes θ₀ and θ_t of ``backbone=synthetic`` (the weights our runner merges, saved by our
Python with :func:`write_weights`) as ``CLIPVisionModel.save_pretrained`` checkpoints, once per bench, outside every timed run. ``run`` calls
the row's FusionBench class unchanged on a ``CLIPVisionModelPool`` of those paths. Time: ``run()`` minus
the time spent inside the pool's ``load_model`` (reading a checkpoint is loading, not merging: our
runner subtracts it the same way); data-driven rows add the reading of their batch and spec files and
the building of the models a class is served in place of the pool's (AdaMerging++'s pruned copies,
continual fine-tuning's CLIP model) to that loading time. Memory: the process's sampled peak RSS during ``run()``, loading
included (what a user's process holds). Prints ``BENCH_RESULT {json}``.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

from otmf_exp.benchmark.throughput import MARK
from otmf_exp.parity.reference.zoo import Zoo


def model_names(tasks: int) -> list[str]:
    """θ₀ first, then the task models, as FusionBench pools name them."""
    return ["_pretrained_"] + [f"task{i:02d}" for i in range(tasks)]


def write_weights(arch: str, tasks: int, root: Path) -> None:
    """θ₀ and θ_t as plain safetensors, written by *our* Python: the seeded init of a CLIP tower differs
    between transformers versions, so the weights must come from the side whose runner merges them."""
    from safetensors.torch import save_file

    from otmf_exp.offline.synthetic import SyntheticBackbone

    root.mkdir(parents=True, exist_ok=True)
    bb = SyntheticBackbone(arch, "cpu")
    for name in model_names(tasks):
        weights = bb.pretrained_state() if name == "_pretrained_" else bb.load_finetuned(name)
        save_file({k: v.contiguous() for k, v in weights.items()}, str(root / f"{name}.safetensors"))
        del weights


def export(spec: dict) -> dict:
    """The weights of :func:`write_weights` (``spec["weights"]``) as FusionBench-style ``CLIPVisionModel``
    checkpoints in ``spec["dir"]`` (run in FusionBench's Python, its transformers)."""
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from otmf_exp.offline.synthetic import ARCHS

    root, src = Path(spec["dir"]), Path(spec["weights"])
    cfg = CLIPVisionConfig(**{k: v for k, v in ARCHS[spec["arch"]].items() if k != "projection_dim"})
    for name in model_names(int(spec["tasks"])):
        model = CLIPVisionModel(cfg)
        weights = {
            k.removeprefix("vision_model."): v for k, v in load_file(src / f"{name}.safetensors").items()
        }
        target = model.vision_model if hasattr(model, "vision_model") else model
        res = target.load_state_dict(weights, strict=False)
        if res.missing_keys:
            raise SystemExit(f"error: synthetic weights lack {res.missing_keys[0]}; the towers differ")
        model.save_pretrained(str(root / name))
        del model, weights
    return {"dir": str(root), "models": len(model_names(int(spec["tasks"])))}


def _algorithm(row: str):
    from otmf_exp.benchmark.peer_methods import PEER

    r = PEER[row]
    module, cls = r.fb_class.rsplit(".", 1)
    algo = getattr(importlib.import_module(module), cls)(**r.fb_kwargs)
    # continual classes read the program's task pool only when evaluating on every step (off here)
    taskpool = type("TaskPool", (), {"_test_datasets": {}})()
    algo._program = type("Program", (), {"taskpool": taskpool})()
    return algo


def consensus(pool, spec: dict) -> dict:
    """Consensus TA through FusionBench's TALL-mask functions (parity's reference drives them) on the
    pool's models: θ₀ + 0.3·(τ_MTL ⊙ [#masks ≥ 2]), λ_t = 0.6."""
    from otmf_exp.parity.reference.task_arithmetic import _consensus
    from otmf_exp.parity.reference.zoo import PRETRAINED

    class Towers:  # the parity reference's zoo interface over the pool (loads timed as loading)
        def towers(self) -> dict:
            return {
                PRETRAINED: pool.load_model(PRETRAINED),
                **{n: pool.load_model(n) for n in pool.model_names},
            }

    return _consensus(Towers(), bug=False)


class _Heads:
    """Our synthetic zero-shot heads and θ₀'s projection (:data:`~otmf_exp.benchmark.peer_data.HEADS`)
    in the interface of parity's ``Zoo`` (``heads``, ``projection(dtype)``) that its plumbing takes."""

    projection = Zoo.projection  # the frozen ``visual_projection`` FusionBench's CLIP algorithms hold

    def __init__(self, root: Path) -> None:
        import torch
        from safetensors.torch import load_file

        from otmf_exp.benchmark.peer_data import HEADS

        self.heads = load_file(str(root / HEADS))
        self.pretrained = {"visual_projection.weight": self.heads.pop("_projection_")}
        self.dtype = torch.float32


def _clip_setup(alg, root: Path) -> None:
    """Parity's plumbing (identity Fabric and processor) with our synthetic heads and projection."""
    import torch

    from otmf_exp.parity.reference.fisher_regmean import _Fabric

    heads = _Heads(root)
    alg._fabric_instance = _Fabric()
    alg._clip_processor = lambda x: x
    alg.visual_projection = heads.projection()
    alg.logit_scale_exp = torch.tensor(1.0)
    alg.zeroshot_weights = heads.heads


def _data_merge(pool, spec: dict, alg, weights_of, merge) -> dict:
    """Per task: θ_t from the pool, its batches (read time counted as loading), ``weights_of``; then
    ``merge(params, per-task weights)``: FusionBench's Fisher/RegMean loop on our batches."""
    from otmf_exp.benchmark.peer_data import read_batches

    root = Path(spec["dir"])
    _clip_setup(alg, root)
    params: dict = {}
    got = []
    for t in pool.model_names:
        model = pool.load_model(t)
        for k, v in model.state_dict().items():
            params.setdefault(k, []).append(v.detach().clone())
        t0 = time.perf_counter()
        data = read_batches(root / f"{spec['row']}.batches.safetensors", t)
        spec["_loading"] += time.perf_counter() - t0
        got.append(weights_of(alg, t, model, data))
    return merge(params, got)


def fisher(pool, spec: dict) -> dict:
    """FusionBench's ``get_fisher_weights`` per task on our batches, ``merging_with_fisher_weights``."""
    import torch
    from fusion_bench.method.fisher_merging.fisher_merging import merging_with_fisher_weights

    from otmf_exp.parity.reference.fisher_regmean import fisher_algorithm

    alg = fisher_algorithm()
    n = len(pool.model_names)
    return _data_merge(
        pool,
        spec,
        alg,
        lambda a, t, m, d: a.get_fisher_weights(t, m, d, list(m.state_dict())),
        lambda p, w: merging_with_fisher_weights(p, w, torch.ones(n) / n, True, 1e-6),
    )


def regmean(pool, spec: dict) -> dict:
    """FusionBench's ``get_regmean_weights`` per task on our batches (its loader told not to reshuffle:
    it gets them in our drawn order), ``merging_with_regmean_weights``."""
    import fusion_bench.method.regmean.clip_regmean as clip_regmean
    import torch
    from fusion_bench.method.regmean.regmean import merging_with_regmean_weights
    from fusion_bench.method.regmean.utils import get_modules_to_merge

    from otmf_exp.parity.reference.fisher_regmean import regmean_algorithm

    alg = regmean_algorithm()
    real = clip_regmean.DataLoader
    clip_regmean.DataLoader = lambda ds, shuffle, **kw: real(ds, shuffle=False, **kw)
    try:
        return _data_merge(
            pool,
            spec,
            alg,
            lambda a, t, m, d: a.get_regmean_weights(t, m, d, get_modules_to_merge(m, [torch.nn.Linear])),
            lambda p, w: merging_with_regmean_weights(p, w, 0.95, True),
        )
    finally:
        clip_regmean.DataLoader = real


def adamerging(pool, spec: dict) -> dict:
    """FusionBench's task- or layer-wise AdaMerging class (``run()`` unchanged) with parity's plumbing
    (``reference.adamerging.algorithm``: its settings, the batches our method drew, our heads); for
    AdaMerging++ the pool's task models TIES-pruned first (parity's ``ties_pruned``, merge time), the
    pruned models' copies counted as loading as the pool's are."""
    from otmf_exp.benchmark.peer_methods import PEER
    from otmf_exp.parity.reference.adamerging import Pool, algorithm, served, ties_pruned

    opts = PEER[spec["row"]].overrides
    plus = opts.get("tv_prune") == "ties"
    t0 = time.perf_counter()
    streams = served(Path(spec["dir"]), spec["row"], pool.model_names)
    spec["_loading"] += time.perf_counter() - t0
    algo = algorithm(opts["granularity"], _Heads(Path(spec["dir"])), pool.model_names, streams, plus=plus)
    if plus:
        names = ["_pretrained_", *pool.model_names]
        pruned = ties_pruned(Pool({n: pool.load_model(n) for n in names}), opts.get("ties_density", 0.2))
        copy = pruned.load_model

        def load_model(*a, **k):  # a copy of a pruned model stands for the pool's load: loading
            t0 = time.perf_counter()
            out = copy(*a, **k)
            spec["_loading"] += time.perf_counter() - t0
            return out

        pruned.load_model = load_model
        pool = pruned
    return algo.run(pool)


def concrete(pool, spec: dict):
    """FusionBench's Concrete class for the row's merge (``run()`` unchanged) with parity's plumbing
    (``reference.concrete.algorithm``: its settings, the batches our method drew, our heads, its global
    RNG seeded with our mask seed after its model setup)."""
    import json

    from otmf_exp.benchmark.peer_methods import PEER
    from otmf_exp.parity.reference.adamerging import served
    from otmf_exp.parity.reference.concrete import algorithm

    root, row = Path(spec["dir"]), spec["row"]
    t0 = time.perf_counter()
    streams = served(root, row, pool.model_names)
    seed = json.loads((root / f"{row}.spec.json").read_text())["mask_seed"]
    spec["_loading"] += time.perf_counter() - t0
    merge = PEER[row].overrides["merge"]
    return algorithm(merge, _Heads(root), pool.model_names, streams, seed)[0].run(pool)


def continual_finetune(pool, spec: dict):
    """FusionBench's ``ContinualImageClassificationFineTuningForCLIP`` (``run()`` unchanged) with
    parity's plumbing (``reference.finetune.finetune``: the batches our method drew, our heads, θ₀ of
    the pool with our projection; no per-task snapshots); building the CLIP model it is served counts
    as loading, as the pool's loads do."""
    import json

    from safetensors.torch import load_file

    from otmf_exp.parity.reference.adamerging import weights
    from otmf_exp.parity.reference.finetune import finetune

    root, row = Path(spec["dir"]), spec["row"]
    t0 = time.perf_counter()
    settings = json.loads((root / f"{row}.spec.json").read_text())
    batches = load_file(str(root / f"{row}.batches.safetensors"))
    spec["_loading"] += time.perf_counter() - t0
    heads = _Heads(root)
    proj = heads.pretrained["visual_projection.weight"]
    pre = pool.load_model("_pretrained_")
    vision_cfg = {**pre.config.to_dict(), "projection_dim": proj.shape[0]}
    pretrained = {**weights(pre), "visual_projection.weight": proj}
    del pre

    def timed(build):  # building the CLIP model it is served: loading, as the pool's loads
        def wrapped():
            t0 = time.perf_counter()
            out = build()
            spec["_loading"] += time.perf_counter() - t0
            return out

        return wrapped

    final, _, _ = finetune(
        vision_cfg,
        pretrained,
        heads.heads,
        settings,
        batches,
        root / f"{row}.fb_logs",
        snapshot=False,
        wrap=timed,
    )
    return final


def run(spec: dict) -> dict:
    import psutil
    import torch
    from fusion_bench.modelpool import CLIPVisionModelPool
    from safetensors.torch import save_file

    from otmf_exp.runtime.measure import measure

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    root = Path(spec["dir"])
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    pool = CLIPVisionModelPool(
        models={
            n: {
                "_target_": "transformers.CLIPVisionModel.from_pretrained",
                "pretrained_model_name_or_path": str(root / n),
            }
            for n in names
        }
    )
    loading = 0.0
    load = pool.load_model

    def timed_load(*a, **k):  # loading is not merging: subtracted, as our runner does
        nonlocal loading
        t0 = time.perf_counter()
        out = load(*a, **k)
        loading += time.perf_counter() - t0
        return out

    pool.load_model = timed_load
    from otmf_exp.benchmark.peer_methods import PEER

    call = PEER[spec["row"]].fb_call
    if call:
        module, fn = call.split(":")
        merge = getattr(importlib.import_module(module), fn)
    else:
        merge = _algorithm(spec["row"]).run
    baseline = psutil.Process().memory_info().rss / 2**20
    spec["_loading"] = 0.0  # data files read by a data-driven row (loading, as the models are)
    with measure(torch.device("cpu")) as usage:
        merged = merge(pool, spec) if call else merge(pool)
    loading += spec.pop("_loading")
    if isinstance(merged, dict) and "merged" in merged:  # some classes return {"merged": model, ...}
        merged = merged["merged"]
    if spec.get("merged_to"):
        sd = merged if isinstance(merged, dict) else merged.state_dict()
        save_file({k: v.detach().contiguous() for k, v in sd.items()}, spec["merged_to"])
    return {
        "merge_s": usage.wall_s - loading,
        "load_s": loading,
        "peak_mb": usage.peak_memory_mb,
        "baseline_mb": baseline,
        "threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    what, arg = sys.argv[1], json.loads(sys.argv[2])
    print(MARK + json.dumps(export(arg) if what == "export" else run(arg)), flush=True)
