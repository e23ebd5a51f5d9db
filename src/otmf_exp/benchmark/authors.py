"""The OTMF authors' own mask training (``compute_sr_mask`` of GitHub 37ETs/OT_fusion) on the benchmark's
synthetic tower, for the side-by-side rows "OTMF step time / memory vs the authors' step".

Run with a Python whose environment can import the authors' checkout (``spec["repo"]``, their
``src/`` package, read as they ship it; it needs ``matplotlib`` beside torch and geomloss) and this
package:

    AUTHORS_PY -m otmf_exp.benchmark.authors '{"repo": DIR, "arch": "vit_b32", "iterations": 10}'

It builds exactly what step 2 of our ``backbone=synthetic`` run fuses: the same seeded θ₀ (HF
``CLIPVisionModelWithProjection`` with random weights), τ_pre = θ_1 − θ₀ (step 2's previous merged
model is task 1's), τ_post = θ_2 − θ₀, and random 224² images in batches of ``batch_size`` — then
calls ``compute_sr_mask`` unchanged (``device="cpu"``, ``mask_alpha`` = α, ``max_epochs`` =
iterations, their alternate schedule and best-loss copies). One shim, which their GPU path makes
implicitly: their ``RouteMergedModel.merge_weights`` adds the fused task vector in place into
``pretrained_state_dict[k].to(device)``; on a GPU that ``.to`` is a fresh copy of θ₀ each iteration,
on the CPU it is θ₀ itself (the run would drift θ₀ and train on wrong weights). The shim hands out
a copy of θ₀'s tensor per read, i.e. the GPU path's host-to-device copy. The model wrapper returns
``image_embeds`` (our OTMF features; theirs is open_clip's ``ImageEncoder`` output, the same thing).

Time: wall time of ``compute_sr_mask`` (teacher copies, training, best masks, final merge); memory:
the process's sampled peak RSS during it (``otmf_exp.runtime.measure``, as our runner's
``peak_memory_mb``). Prints ``BENCH_RESULT {json}``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from otmf_exp.benchmark.throughput import MARK


class _CopyOnRead(dict):
    """θ₀'s state dict that returns a fresh copy of a tensor on each ``d[k]`` (their GPU path's ``.to``)."""

    def __getitem__(self, k: str) -> Any:
        return dict.__getitem__(self, k).clone()


def _batches(data: Any, batch_size: int, seed: int) -> Any:
    """An iterable of ``(images, labels)`` (their ``maybe_dictionarize`` tuple form), made lazily."""

    class Loader:
        def __iter__(self):
            for b in data.loader("test", batch_size, shuffle=True, seed=seed):
                yield b["inputs"], b["labels"]

    return Loader()


def run(spec: dict) -> dict:
    import psutil
    import torch
    from torch import nn

    sys.path.insert(0, spec["repo"])
    import src.route_merged_model as rmm  # the authors' package, from their checkout
    from src.tasks.shortest_route_mask import compute_sr_mask

    from otmf_exp.offline.synthetic import SyntheticBackbone
    from otmf_exp.runtime.measure import measure

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    if spec.get("matmul_precision"):
        torch.set_float32_matmul_precision(spec["matmul_precision"])
    bs, iters = int(spec.get("batch_size", 16)), int(spec["iterations"])
    bb = SyntheticBackbone(spec.get("arch", "vit_b32"), "cpu")

    class Tower(nn.Module):  # their ImageEncoder(x) -> features; here CLIP's projected embedding
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(pixel_values=x).image_embeds

    model = Tower(bb.module)
    theta0 = bb.pretrained_state()

    def tv(task: str) -> dict:
        ft = bb.load_finetuned(task)
        return {f"m.{k}": ft.pop(k).sub_(theta0[k]) for k in list(ft)}

    tv_pre, tv_post = tv("task00"), tv("task01")
    sizes = {"test": bs * (iters // 2 + 1)}
    pre, post = (bb.task_data(n, sizes) for n in ("task00", "task01"))
    init = rmm.RouteMergedModel.__init__

    def init_cpu(self, *a, **k):
        init(self, *a, **k)
        self.pretrained_state_dict = _CopyOnRead(self.pretrained_state_dict)

    rmm.RouteMergedModel.__init__ = init_cpu
    torch.manual_seed(0)
    baseline = psutil.Process().memory_info().rss / 2**20
    with measure(torch.device("cpu")) as usage:
        merged = compute_sr_mask(
            tv_pre,
            tv_post,
            model,
            dict(tv_pre),  # only shapes are read: compute_sr_mask replaces them by ones
            dict(tv_post),
            lr=float(spec.get("lr", 0.01)),
            max_epochs=iters,
            pre_task_dataloader=_batches(pre, bs, 1),
            post_task_dataloader=_batches(post, bs, 2),
            mask_alpha=float(spec.get("alpha", 0.8)),
            device="cpu",
        )
    return {
        "wall_s": usage.wall_s,
        "peak_mb": usage.peak_memory_mb,
        "baseline_mb": baseline,
        "iterations": iters,
        "batch_size": bs,
        "threads": torch.get_num_threads(),
        "finite": all(bool(torch.isfinite(v).all()) for v in merged.values() if v.is_floating_point()),
    }


if __name__ == "__main__":
    print(MARK + json.dumps(run(json.loads(sys.argv[1]))), flush=True)
