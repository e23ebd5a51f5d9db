"""Per-example throughput of ``backbone.evaluate`` vs a raw forward of the same module (tiny models).

Builds the tiny stand-in models and datasets of ``otmf_exp.offline.tiny_hub`` in a temp dir, then times:

  evaluate      backbone.evaluate(θ0, head, data, "test", bs): reading + preprocessing (DataLoader,
                backbone.num_workers) + functional_call forward + head + accuracy
  data only     iterating data.loader("test", bs) (reading + preprocessing, no model)
  raw forward   module(x) on the same, already preprocessed batches held in memory (no data pipeline,
                no functional_call) -- for T5: module.generate on pre-tokenized batches

    python scripts/eval_throughput.py --backbone hf_clip --n 1024 --batch-size 128 --num-workers 0
    python scripts/eval_throughput.py --backbone open_clip --n 1024
    python scripts/eval_throughput.py --backbone hf_t5 --n 256 --batch-size 64
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def _rate(fn, n: int, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", choices=["hf_clip", "open_clip", "hf_t5"], default="hf_clip")
    ap.add_argument("--n", type=int, default=1024, help="test examples")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    return ap


def _build(args: argparse.Namespace, root: Path, device):
    """The tiny stand-ins of ``args.backbone`` under ``root``; returns (backbone, task data)."""
    from omegaconf import OmegaConf

    from otmf_exp.config import BackboneConfig
    from otmf_exp.data import build_task_data
    from otmf_exp.models import build_backbone
    from otmf_exp.offline import tiny_hub

    os.environ["OTMF_EXP_CACHE"] = str(root / "cache")
    cfg = OmegaConf.structured(BackboneConfig)
    cfg.local_dir, cfg.batch_size, cfg.num_workers = str(root), args.batch_size, args.num_workers
    if args.backbone == "hf_t5":
        task = "cola"
        tiny_hub.build_t5(root, [task], lora=None)
        tiny_hub.build_glue_datasets(root, [task], n_train=10, n_val=args.n)
        cfg.name, cfg.kind, cfg.model_id, cfg.finetuned = (
            "flan_t5_base",
            "hf_t5",
            tiny_hub.T5_ID,
            tiny_hub.T5_FT,
        )
        seq = {"name": "glue8", "kind": "glue"}
    else:
        task = "mnist"
        tiny_hub.build_vision_datasets(root, [task], n_train=10, n_test=args.n)
        if args.backbone == "hf_clip":
            tiny_hub.build_hf_clip(root, [task])
            cfg.name, cfg.kind = "clip_vit_b32", "hf_clip"
            cfg.model_id, cfg.finetuned = tiny_hub.CLIP_ID, tiny_hub.CLIP_FT
        else:
            cfg.arch = str(tiny_hub.build_open_clip(root, [task]))
            cfg.name, cfg.kind, cfg.model_id = "openclip_vit_b32", "open_clip", tiny_hub.OPENCLIP_ID
            cfg.checkpoint_dir = str(root / "checkpoints")
        seq = {"name": "vit8", "kind": "hf_vision"}
    bb = build_backbone(cfg, device, progress=False)
    seq_cfg = OmegaConf.create({**seq, "tasks": [task], "local_dir": str(root)})
    return bb, build_task_data(task, seq_cfg, bb)


def _measure(args: argparse.Namespace, bb, data) -> list[tuple[str, float]]:
    import torch

    head, params = bb.zero_shot_head(data), bb.pretrained_state()
    n, bs = data.size("test"), args.batch_size
    batches = [bb.to_device(b["inputs"]) for b in data.loader("test", bs)]

    def evaluate() -> None:
        bb.evaluate(params, head, data, "test", bs)

    def data_only() -> None:
        for _ in data.loader("test", bs):
            pass

    @torch.inference_mode()
    def raw() -> None:
        for x in batches:
            if args.backbone == "hf_t5":
                bb.module.generate(**x, max_new_tokens=bb.max_new_tokens, do_sample=False, num_beams=1)
            elif args.backbone == "hf_clip":
                bb.module(pixel_values=x)
            else:
                bb.module(x)

    return [
        (name, _rate(fn, n, args.repeats))
        for name, fn in (("evaluate", evaluate), ("data only", data_only), ("raw forward", raw))
    ]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        bb, data = _build(args, Path(tmp), device)
        rows = _measure(args, bb, data)
    print(
        f"{args.backbone}: n={data.size('test')} batch={args.batch_size} workers={args.num_workers} "
        f"threads={torch.get_num_threads()} device={device}"
    )
    for name, r in rows:
        print(f"  {name:12s} {r:10.1f} examples/s   ({1e3 / r:.3f} ms/example)")
    print(f"  evaluate / raw forward = {rows[0][1] / rows[2][1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
