"""The kernel floors of TSV-Merge and OPCM: only their SVDs, on the shapes of the peer table's tower, in one process.

    python -m otmf_exp.benchmark.peer_floor '{"arch": "vit_b32_l4", "tasks": 8, "threads": 1}'
    python -m otmf_exp.benchmark.peer_floor '{"method": "opcm", "arch": "vit_b32_l4", "tasks": 8, "threads": 1}'

Both TSV-M implementations (ours, FusionBench's ``compute_and_sum_svd_mem_reduction``) spend their time
in ``torch.linalg.svd``: per 2-D matrix ``[m, n]`` of the tower, one reduced SVD of each task's τ and
two of the stacked factors (``[m, k]`` and ``[k, n]``, k = min(m, n)). This times exactly those SVDs
(float32, seeded N(0, 1) matrices of those shapes: the SVD's cost depends on the shape, not the
values) and nothing else, so ``merge time / floor`` says how much of a run is not the kernel.

OPCM (``method: opcm``): at every step t ≥ 2 one SVD of τᵐ per ``nn.Linear`` weight ``[m, n]`` of the
tower, reduced (``full_matrices=False``: ours; FusionBench's ``opcm.utils.svd`` computes the full one,
a larger kernel, so the reduced SVD is the lower of the two floors). Prints ``BENCH_RESULT {json}``.
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


def opcm_shapes(arch: str) -> list[tuple[int, int]]:
    """``[m, n]`` of every ``nn.Linear`` weight of the synthetic tower ``arch`` (OPCM's SVD rule)."""
    from otmf_exp.offline.synthetic import SyntheticBackbone

    bb = SyntheticBackbone(arch, "cpu")
    linear = bb.linear_weight_names()
    return [tuple(v.shape) for k, v in bb.pretrained_state().items() if k in linear]


def opcm_floor(shapes: list[tuple[int, int]], tasks: int, repeats: int = 3) -> dict:
    """Min over ``repeats`` of the summed time of OPCM's SVDs: ``tasks − 1`` steps, one reduced float32
    SVD of each matrix in ``shapes`` per step."""
    import torch

    g = torch.Generator().manual_seed(0)
    best = float("inf")
    for _ in range(repeats):
        total = 0.0
        for m, n in shapes:
            for _ in range(max(tasks - 1, 0)):
                a = torch.randn(m, n, generator=g)
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
    method, repeats = spec.get("method", "tsvm"), int(spec.get("repeats", 3))
    if method == "opcm":
        out = opcm_floor(opcm_shapes(spec["arch"]), int(spec["tasks"]), repeats)
    elif method == "tsvm":
        out = tsvm_floor(tsvm_shapes(spec["arch"]), int(spec["tasks"]), repeats)
    else:
        raise SystemExit(f"error: no kernel floor for method {method!r}; use tsvm or opcm")
    out |= {"method": method, "arch": spec["arch"], "threads": torch.get_num_threads()}
    print(MARK + json.dumps(out), flush=True)
