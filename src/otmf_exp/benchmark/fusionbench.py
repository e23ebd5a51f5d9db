"""FusionBench 0.2.33's own OPCM (``OPCMForCLIP``) on the benchmark's synthetic towers, for a side-by-side row.

Run with a Python that has ``fusion-bench==0.2.33`` installed (it needs ``transformers<5``):

    FB_PY -m otmf_exp.benchmark.fusionbench '{"arch": "vit_b32", "tasks": 3, "alpha": 0.5}'

It builds exactly the models our ``backbone=synthetic`` run merges (same config, same seeded θ₀
and θ_t = θ₀ + noise), saves them with ``save_pretrained`` like FusionBench's hub checkpoints, and
calls FusionBench's algorithm unchanged through a ``CLIPVisionModelPool`` of those paths. Time:
FusionBench's own "merging model" profile (steps 2..T, loading excluded, as our ``time_s``) and
``run()`` minus loading; memory: the process's sampled peak RSS during ``run()``, loading
included as in a real run. Prints ``BENCH_RESULT {json}``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

MARK = "BENCH_RESULT "


def _save_models(root: Path, arch: str, tasks: int) -> dict[str, str]:
    """θ₀ and θ_t of the synthetic backbone as FusionBench-style ``CLIPVisionModel`` checkpoints."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from otmf_exp.offline.synthetic import ARCHS, SyntheticBackbone

    bb = SyntheticBackbone(arch, "cpu")
    cfg = CLIPVisionConfig(**{k: v for k, v in ARCHS[arch].items() if k != "projection_dim"})
    paths = {}
    names = ["_pretrained_"] + [f"task{i:02d}" for i in range(tasks)]
    for name in names:
        weights = bb.pretrained_state() if name == "_pretrained_" else bb.load_finetuned(name)
        model = CLIPVisionModel(cfg)
        missing = model.load_state_dict(weights, strict=False).missing_keys
        assert not missing, missing
        paths[name] = str(root / name)
        model.save_pretrained(paths[name])
        del model, weights
    torch.manual_seed(0)
    return paths


def run(spec: dict) -> dict:
    import psutil
    import torch
    from fusion_bench.method.opcm.opcm import OPCMForCLIP
    from fusion_bench.modelpool import CLIPVisionModelPool

    from otmf_exp.runtime.measure import measure

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    with tempfile.TemporaryDirectory() as tmp:
        paths = _save_models(Path(tmp), spec["arch"], int(spec["tasks"]))
        pool = CLIPVisionModelPool(
            models={
                k: {
                    "_target_": "transformers.CLIPVisionModel.from_pretrained",
                    "pretrained_model_name_or_path": v,
                }
                for k, v in paths.items()
            }
        )
        loading = 0.0
        load = pool.load_model

        def timed_load(*a, **k):  # loading is not merging: subtract it, as our runner does
            nonlocal loading
            t0 = time.perf_counter()
            out = load(*a, **k)
            loading += time.perf_counter() - t0
            return out

        pool.load_model = timed_load
        algo = OPCMForCLIP(
            alpha=float(spec["alpha"]),
            shuffle_order=False,
            save_on_every_step=False,
            evaluate_on_every_step=False,
        )
        taskpool = type("TaskPool", (), {"_test_datasets": {}})()  # evaluate_on_every_step=False: unused
        algo._program = type("Program", (), {"taskpool": taskpool})()
        baseline = psutil.Process().memory_info().rss / 2**20
        with measure(torch.device("cpu")) as usage:
            merged = algo.run(pool)
        sd = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    merge_s = sum(algo.profiler.recorded_durations.get("merging model", []))  # FusionBench's own timer
    return {
        "wall_s": usage.wall_s - loading,
        "merge_s": merge_s,
        "load_s": loading,
        "peak_mb": usage.peak_memory_mb,
        "baseline_mb": baseline,
        "tasks": int(spec["tasks"]),
        "n_params": sum(v.numel() for v in sd.values()),
    }


if __name__ == "__main__":
    print(MARK + json.dumps(run(json.loads(sys.argv[1]))), flush=True)
