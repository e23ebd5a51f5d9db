"""The kernel floor of TSV-Merge: only its SVDs, on the shapes of the peer table's tower, in one process.

    python -m otmf_exp.benchmark.peer_floor '{"arch": "vit_b32_l4", "tasks": 8, "threads": 1}'

Both TSV-M implementations (ours, FusionBench's ``compute_and_sum_svd_mem_reduction``) spend their time
in ``torch.linalg.svd``: per 2-D matrix ``[m, n]`` of the tower, one reduced SVD of each task's τ and
two of the stacked factors (``[m, k]`` and ``[k, n]``, k = min(m, n)). This times exactly those SVDs
(float32, seeded N(0, 1) matrices of those shapes: the SVD's cost depends on the shape, not the
values) and nothing else, so ``merge time / floor`` says how much of a run is not the kernel.
Prints ``BENCH_RESULT {json}``.
"""

from __future__ import annotations

import json
import sys
import time

from otmf_exp.benchmark.throughput import MARK


def tsvm_shapes(arch: str) -> list[tuple[int, int]]:
    """``[m, n]`` of every 2-D mergeable tensor of the synthetic tower ``arch``."""
    from otmf_exp.offline.synthetic import SyntheticBackbone

    return [
        tuple(v.shape) for v in SyntheticBackbone(arch, "cpu").pretrained_state().values() if v.dim() == 2
    ]


def tsvm_floor(shapes: list[tuple[int, int]], tasks: int, repeats: int = 3) -> dict:
    """Min over ``repeats`` of the summed SVD time of TSV-M on ``shapes`` with ``tasks`` task vectors."""
    import torch

    g = torch.Generator().manual_seed(0)
    best = float("inf")
    for _ in range(repeats):
        total = 0.0
        for m, n in shapes:
            k = min(m, n)
            mats = [torch.randn(m, n, generator=g) for _ in range(tasks)]
            mats += [torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)]
            for a in mats:
                t0 = time.perf_counter()
                torch.linalg.svd(a, full_matrices=False)
                total += time.perf_counter() - t0
        best = min(best, total)
    return {"svd_s": best, "matrices": len(shapes), "tasks": tasks, "repeats": repeats}


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    out = tsvm_floor(tsvm_shapes(spec["arch"]), int(spec["tasks"]), int(spec.get("repeats", 3)))
    print(MARK + json.dumps(out | {"arch": spec["arch"], "threads": torch.get_num_threads()}), flush=True)
