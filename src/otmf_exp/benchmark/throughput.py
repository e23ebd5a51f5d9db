"""Evaluation throughput worker: ``Backbone.evaluate`` vs a raw forward of the same module, in a fresh process.

    python -m otmf_exp.benchmark.throughput '{"arch": "vit_b32", "device": "cpu", ...}'

prints one line ``BENCH_RESULT {json}`` (read by :func:`otmf_exp.benchmark.runs.run_throughput`).
"""

from __future__ import annotations

import json
import sys
import time

from otmf_exp.merging.task_vectors import num_bytes

MARK = "BENCH_RESULT "


def throughput(spec: dict) -> dict:
    """Images/s of ``Backbone.evaluate`` and of a raw forward on the same images (best of ``repeats``)."""
    import torch

    from otmf_exp.offline.synthetic import SyntheticBackbone

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    bb = SyntheticBackbone(spec["arch"], device, autocast=spec.get("autocast", "float32"))
    bb.batch_size = int(spec["eval_batch_size"])
    from otmf_exp.data.base import TensorTaskData

    n, bs, s = int(spec["eval_images"]), int(spec["eval_batch_size"]), bb.image_size
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, s, s, generator=g), torch.randint(0, 10, (n,), generator=g)
    data = TensorTaskData("bench", {"test": (x, y)}, [f"c{i}" for i in range(10)])
    head, pre = bb.zero_shot_head(data), bb.pretrained_state()
    on_device = [x[i : i + bs].to(device) for i in range(0, n, bs)]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    @torch.inference_mode()
    def raw():
        for xb in on_device:
            bb.module(pixel_values=xb)
        sync()

    def evaluate():
        bb.evaluate(pre, head, data, "test", bs)
        sync()

    def rate(fn) -> float:
        fn()  # warm-up
        best = float("inf")
        for _ in range(int(spec["repeats"])):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return n / best

    r_raw, r_eval = rate(raw), rate(evaluate)  # interleave once more to even out machine noise
    r_raw, r_eval = max(r_raw, rate(raw)), max(r_eval, rate(evaluate))
    model_mb = num_bytes(pre) / 2**20
    return {"raw_per_s": r_raw, "evaluate_per_s": r_eval, "images": n, "batch_size": bs, "model_mb": model_mb}


if __name__ == "__main__":
    print(MARK + json.dumps(throughput(json.loads(sys.argv[1]))), flush=True)
