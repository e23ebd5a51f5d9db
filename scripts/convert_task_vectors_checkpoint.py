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

SECURITY: this script UNPICKLES its input (``torch.load(weights_only=False)``), which can run
arbitrary code: run it only on files you trust. It says so on every run.

Checks, each a one-line ``error:`` and exit code 2 before anything is written: unreadable input
(missing, not a pickle, its classes not importable without ``--code``), an output that cannot be
written, and, when the architecture is known (``--arch NAME|config.json``, or an open_clip
architecture name found in the input path such as ``checkpoints/ViT-B-32/...``), names and
shapes against that architecture's image tower (first differing key named). Outputs are written
atomically (temp file + rename).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

EXIT_ERROR = 2
TRUST = (
    "warning: this script unpickles {src} (torch.load with weights_only=False), which can run "
    "arbitrary code: only run it on checkpoints you trust"
)


class ConvertError(Exception):
    """One line for the user; the script exits with code 2."""


def _state_dict(obj: Any, src: Path) -> dict[str, Any]:
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
    raise ConvertError(
        f"{src}: unsupported checkpoint object {type(obj).__name__} (expected a module or a state dict)"
    )


def _load(src: Path) -> dict[str, Any]:
    """Unpickle ``src`` (trusted files only) and return its image tower's weights."""
    import torch

    from otmf_exp.models.open_clip import normalise_keys

    if not src.is_file():
        raise ConvertError(f"cannot read {src}: no such file")
    try:
        obj = torch.load(src, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as e:
        raise ConvertError(
            f"cannot unpickle {src}: {type(e).__name__}: {e}; pass --code DIR with the repository that "
            "pickled it (e.g. --code ~/src/task_vectors)"
        ) from None
    except Exception as e:  # not a torch file, truncated, unreadable
        raise ConvertError(
            f"cannot read {src}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    sd = normalise_keys({k: v for k, v in _state_dict(obj, src).items() if isinstance(v, torch.Tensor)})
    if not sd:
        raise ConvertError(f"{src} has no image-tower (visual.*) weights")
    return sd


def arch_from(src: Path, arch: str | None) -> str | None:
    """The open_clip architecture to check shapes against: ``--arch`` (a name or a model-config
    JSON), else the first component of ``src``'s path that names an open_clip architecture."""
    import open_clip

    if arch:
        from otmf_exp.errors import UserError
        from otmf_exp.models.open_clip import register_arch

        try:
            return register_arch(arch)
        except UserError as e:
            raise ConvertError(str(e)) from None
    for part in reversed(src.resolve().parts):
        if open_clip.get_model_config(part) is not None:
            return part
    return None


def reference_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the image tower of open_clip ``arch`` (random init: nothing downloaded)."""
    import open_clip

    model = open_clip.create_model(arch, pretrained=None)
    return {f"visual.{k}": tuple(v.shape) for k, v in model.visual.state_dict().items()}


def check_shapes(sd: dict[str, Any], ref: dict[str, tuple[int, ...]], src: Path, arch: str) -> None:
    missing = sorted(set(ref) - set(sd))
    extra = sorted(set(sd) - set(ref))
    if missing or extra:
        key = missing[0] if missing else extra[0]
        what = "lacks" if missing else "has an unexpected"
        raise ConvertError(f"{src} {what} parameter {key!r} for architecture {arch}; pass the right --arch")
    for k, shape in ref.items():
        if tuple(sd[k].shape) != shape:
            raise ConvertError(
                f"{src}: {k} has shape {tuple(sd[k].shape)}, architecture {arch} expects {shape}; pass the right --arch"
            )


def check_writable(out: Path) -> None:
    """The output's directory can be created and written (before the slow unpickling)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.parent / f".{out.name}.probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConvertError(f"cannot write {out} ({e.strerror or e}); choose a writable --out") from None


def convert(src: Path, out: Path, arch: str | None = None) -> int:
    """Load ``src`` (pickle: trusted files only), check it, write the image tower's weights to ``out``."""
    from safetensors.torch import save_file

    from otmf_exp.runtime.files import atomic_path

    check_writable(out)
    sd = _load(src)
    name = arch_from(src, arch)
    if name is not None:
        check_shapes(sd, reference_shapes(name), src, name)
    else:
        print(f"note: shapes of {src} not checked (pass --arch NAME or a model-config JSON to check them)")
    try:
        with atomic_path(out) as tmp:
            save_file({k: v.detach().clone().contiguous() for k, v in sd.items()}, str(tmp))
    except Exception as e:  # OSError or safetensors' wrapper of one (full disk)
        raise ConvertError(
            f"cannot write {out} ({str(e).splitlines()[0]}); free space or choose another --out"
        ) from None
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
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " UNPICKLES its input: only run it on files you trust."
    )
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
    ap.add_argument(
        "--arch", help="open_clip architecture (ViT-B-32, ...) or model-config JSON to check shapes against"
    )
    args = ap.parse_args(argv)
    for p in args.code:
        sys.path.insert(0, str(p.expanduser()))
    try:
        if not os.path.exists(args.src):
            raise ConvertError(f"cannot read {args.src}: no such file or directory")
        jobs = _directory_jobs(args.src, args.out) if args.src.is_dir() else [(args.src, args.out)]
        if not jobs:
            raise ConvertError(f"no <Name>/finetuned.pt checkpoints under {args.src}")
        for src, out in jobs:
            print(TRUST.format(src=src), file=sys.stderr)
            n = convert(src, out, args.arch)
            print(f"{src} -> {out} ({n} tensors)")
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
