"""Convert task_vectors-style pickled image encoders into state-dict files otmf_exp can load safely.

The original task_vectors / TALL-masks code saved whole pickled modules (``torch.save(model)``):
loading one runs arbitrary pickle code and needs that code importable, so otmf_exp refuses them
(``torch.load(weights_only=True)``). Run this once, where the original code is importable
(``--code`` puts its repository on ``sys.path``), on files you trust:

    # one file
    python scripts/convert_task_vectors_checkpoint.py checkpoints/ViT-B-32/MNIST/finetuned.pt \\
        --out tv_state_dicts/mnist.safetensors --code ~/src/task_vectors
    # a whole task_vectors checkpoint directory (<Name>/finetuned.pt, <Name>Val/finetuned.pt)
    python scripts/convert_task_vectors_checkpoint.py checkpoints/ViT-B-32 --out tv_state_dicts \\
        --code ~/src/task_vectors

Output: safetensors with the image tower only (``visual.*`` keys); use the output directory as
``backbone.checkpoint_dir``. Files are named by otmf_exp task name (``mnist.safetensors``,
``stanford-cars.safetensors`` ...).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _state_dict(obj):
    import torch

    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                return obj[key]
        if isinstance(obj.get("model"), torch.nn.Module):
            return obj["model"].state_dict()
        return obj
    raise SystemExit(f"error: unsupported checkpoint object {type(obj).__name__}")


def convert(src: Path, out: Path) -> int:
    """Load ``src`` (pickle: trusted files only), write the image tower's weights to ``out``."""
    import torch
    from safetensors.torch import save_file

    from otmf_exp.models.open_clip import normalise_keys

    obj = torch.load(src, map_location="cpu", weights_only=False)
    sd = normalise_keys({k: v for k, v in _state_dict(obj).items() if isinstance(v, torch.Tensor)})
    if not sd:
        raise SystemExit(f"error: {src} has no image-tower (visual.*) weights")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().clone().contiguous() for k, v in sd.items()}, str(out))
    return len(sd)


def _directory_jobs(src: Path, out: Path) -> list[tuple[Path, Path]]:
    from otmf_exp.data.vision_tasks import TASK_VECTORS_NAMES

    jobs = []
    for task, name in TASK_VECTORS_NAMES.items():
        for sub in (name, f"{name}Val"):
            for fname in ("finetuned.pt", "nonlinear_finetuned.pt"):
                if (src / sub / fname).is_file():
                    jobs.append((src / sub / fname, out / f"{task}.safetensors"))
                    break
            else:
                continue
            break
    return jobs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "src", type=Path, help="a pickled checkpoint file, or a task_vectors checkpoint directory"
    )
    ap.add_argument(
        "--out", type=Path, required=True, help="output .safetensors file (or directory for a directory)"
    )
    ap.add_argument(
        "--code",
        type=Path,
        action="append",
        default=[],
        help="directory to put on sys.path so the pickled classes import (repeatable)",
    )
    args = ap.parse_args(argv)
    for p in args.code:
        sys.path.insert(0, str(p.expanduser()))
    jobs = _directory_jobs(args.src, args.out) if args.src.is_dir() else [(args.src, args.out)]
    if not jobs:
        print(f"error: no <Name>/finetuned.pt checkpoints under {args.src}", file=sys.stderr)
        return 2
    for src, out in jobs:
        n = convert(src, out)
        print(f"{src} -> {out} ({n} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
