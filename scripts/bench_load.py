"""Cost of the input checks per ViT-B/32 model load: the content digest (first hash, cached lookup)
and the tensor checks (models/checks.py), on a random-init HF CLIPVisionModelWithProjection of the
real ViT-B/32 config saved as safetensors (about 335 MB) in DIR.

    OMP_NUM_THREADS=1 python scripts/bench_load.py DIR [--repeats 7]

Prints one line per step (median and min over the repeats, the extremes dropped); BENCHMARKS.md
"Digest cost" and "Tensor check cost" hold its numbers."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _timed(fn, repeats: int) -> tuple[float, float]:
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    kept = sorted(ts)[1:-1] if len(ts) > 2 else ts
    return 1000 * statistics.median(kept), 1000 * kept[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path, help="where the ViT-B/32 file is built (reused when present)")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    os.environ["OTMF_EXP_CACHE"] = tempfile.mkdtemp(prefix="bench_load_")  # a fresh digest cache

    import torch
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from otmf_exp.models.checks import check_file_state, check_pretrained, check_state
    from otmf_exp.offline.synthetic import ARCHS  # the paper's ViT-B/32 config, as the bench uses it
    from otmf_exp.runtime import digest

    args.dir.mkdir(parents=True, exist_ok=True)
    f = args.dir / "model.safetensors"
    if not f.exists():
        torch.manual_seed(0)
        CLIPVisionModelWithProjection(CLIPVisionConfig(**ARCHS["vit_b32"])).save_pretrained(args.dir)
    model = CLIPVisionModelWithProjection.from_pretrained(args.dir).eval()
    sd = load_file(str(f))
    ref = {k: p.detach() for k, p in model.named_parameters() if k.startswith("vision_model.")}
    print(f"{f}: {f.stat().st_size / 2**20:.0f} MB, threads {torch.get_num_threads()}")
    t = time.perf_counter()
    digest.file_digest(f)
    print(f"digest, first hash: {1000 * (time.perf_counter() - t):.0f} ms")
    rows = {
        "digest, cached lookup": lambda: digest.file_digest(f),
        "load_file (for scale)": lambda: load_file(str(f)),
        "check_file_state (keys, dtype, finite)": lambda: check_file_state(sd, sd.keys(), str(f)),
        "check_pretrained (dtype, finite, |w| bound)": lambda: check_pretrained(model, str(f)),
        "check_state (vs θ₀: keys, shapes, dtype, finite)": lambda: check_state(sd, ref, str(f)),
    }
    for name, fn in rows.items():
        med, low = _timed(fn, args.repeats)
        print(f"{name}: median {med:.2f} ms, min {low:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
