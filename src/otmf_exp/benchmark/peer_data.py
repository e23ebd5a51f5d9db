"""The batches a data-driven peer row's method draws on the synthetic tasks, saved for FusionBench's side.

Ours (``task_seq=synthetic``) draws, per task, the batches of :func:`otmf_exp.data.base.example_batches`
from :class:`~otmf_exp.offline.synthetic.SyntheticTaskData` with the seed the method context derives
(``seed_for(method, task)`` of the run's seed). :func:`write_batches` draws the same stream in our Python,
outside every timed run, into one safetensors file (``<task>/<i>/inputs|labels``); the FusionBench side
reads it back with :func:`read_batches` as the (image, label) examples its data loaders take.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from otmf_exp.benchmark.peer_fb import model_names


def runner_sizes() -> dict[str, int]:
    """The synthetic tasks' split sizes in a bench run: ``task_seq=synthetic``'s, validation as
    :func:`~otmf_exp.benchmark.runs.run_overrides` sets it (the shuffles depend on the sizes)."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    from otmf_exp.benchmark.runs import EVAL_IMAGES

    cfg = OmegaConf.load(str(files("otmf_exp.conf") / "task_seq" / "synthetic.yaml"))
    return {**OmegaConf.to_container(cfg.split_sizes), "validation": EVAL_IMAGES}


def write_batches(
    arch: str,
    tasks: int,
    method: str,
    options: dict[str, Any],
    path: Path,
    sizes: dict[str, int] | None = None,
    seed: int = 0,
) -> int:
    """The batches ``method`` (its ``Config`` defaults overridden by ``options``; run seed ``seed``)
    draws per synthetic task, saved to ``path``; returns how many batches in all."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from otmf_exp.data.base import example_batches
    from otmf_exp.merging import METHODS
    from otmf_exp.merging.base import MethodContext
    from otmf_exp.offline.synthetic import ARCHS, SyntheticTaskData

    sizes = sizes or runner_sizes()
    cfg = OmegaConf.structured(METHODS[method].Config(**options))
    ctx = MethodContext(
        None, torch.device("cpu"), torch.Generator().manual_seed(seed), progress=False, seed=seed
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    if method in ADAPTATION:
        return ADAPTATION[method](cfg, ctx, arch, model_names(tasks)[1:], path, sizes)
    out: dict[str, torch.Tensor] = {}
    for t in model_names(tasks)[1:]:
        data = SyntheticTaskData(t, ARCHS[arch]["image_size"], sizes=sizes)
        stream = example_batches(
            data,
            cfg.split,
            cfg.num_examples,
            cfg.batch_size,
            shuffle=cfg.shuffle,
            seed=ctx.seed_for(method, t),
        )
        for i, b in enumerate(stream):
            out[f"{t}/{i}/inputs"], out[f"{t}/{i}/labels"] = b["inputs"].contiguous(), b["labels"]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path))
    return sum(k.endswith("/labels") for k in out)


def _adamerging(cfg: Any, ctx: Any, arch: str, tasks: list[str], path: Path, sizes: dict) -> int:
    """Joint AdaMerging's batches: its own streams (``batch_streams``, key ``("joint",)``, as ``joint``
    builds them), one batch per task per step, recorded (parity's ``Recorder``) and saved in parity's
    layout (``<task>/<i>/x|y``) for its ``served``."""
    from otmf_exp.merging.adamerging.adamerging_pools import batch_streams
    from otmf_exp.offline.synthetic import ARCHS, SyntheticTaskData
    from otmf_exp.parity.adamerging import Recorder, Setup

    datas = {t: Recorder(SyntheticTaskData(t, ARCHS[arch]["image_size"], sizes=sizes)) for t in tasks}
    streams = batch_streams(cfg, ctx, list(datas.values()), ("joint",), [0] * len(tasks))
    for _ in range(cfg.steps):
        for s in streams:
            next(s)
    Setup(None, {}, {}, datas).save_batches(path)
    return cfg.steps * len(tasks)


def _concrete(cfg: Any, ctx: Any, arch: str, tasks: list[str], path: Path, sizes: dict) -> int:
    """Joint Concrete's batches: its streams (``joint``'s seeds), one batch per task per entropy
    (task_arithmetic: one per mask step; adamerging: two per mask step, inner and mask, then one per
    AdaMerging step), saved as :func:`_adamerging` does; beside them ``<row>.spec.json`` with the seed
    of our mask generator, which parity's reference sets FusionBench's global RNG to."""
    import json

    from otmf_exp.offline.synthetic import ARCHS, SyntheticTaskData
    from otmf_exp.parity.adamerging import Recorder, Setup

    datas = {t: Recorder(SyntheticTaskData(t, ARCHS[arch]["image_size"], sizes=sizes)) for t in tasks}
    seed = ctx.seed_for
    streams = [
        d.batches(cfg.adapt_split, cfg.batch_size, seed("concrete", "data", j))
        for j, d in enumerate(datas.values())
    ]
    n = cfg.max_steps if cfg.merge == "task_arithmetic" else 2 * cfg.max_steps + cfg.max_adamerging_steps
    for _ in range(n):
        for s in streams:
            next(s)
    Setup(None, {}, {}, datas).save_batches(path)
    spec = path.with_name(path.name.replace(".batches.safetensors", ".spec.json"))
    spec.write_text(json.dumps({"mask_seed": seed("concrete", "mask")}))
    return n * len(tasks)


def _continual_finetune(cfg: Any, ctx: Any, arch: str, tasks: list[str], path: Path, sizes: dict) -> int:
    """Continual fine-tuning's batches: step t's stream of task t (``step``'s seed), ``steps`` batches
    each, saved as :func:`_adamerging` does; beside them ``<row>.spec.json`` with the settings parity's
    reference takes (tasks in order, steps, batch size, lr, full or LoRA)."""
    import json

    from otmf_exp.offline.synthetic import ARCHS, SyntheticTaskData
    from otmf_exp.parity.adamerging import Recorder, Setup

    datas = {t: Recorder(SyntheticTaskData(t, ARCHS[arch]["image_size"], sizes=sizes)) for t in tasks}
    for t, d in enumerate(datas.values(), start=1):
        stream = d.batches(cfg.split, cfg.batch_size, ctx.seed_for("continual_finetune", t, "batches"))
        for _ in range(cfg.steps):
            next(stream)
    Setup(None, {}, {}, datas).save_batches(path)
    spec = {
        "tasks": tasks,
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "lora": cfg.lora.enabled,
    }
    path.with_name(path.name.replace(".batches.safetensors", ".spec.json")).write_text(json.dumps(spec))
    return cfg.steps * len(tasks)


#: methods whose batches are drawn by their adaptation streams, not ``example_batches``
ADAPTATION = {"adamerging": _adamerging, "concrete": _concrete, "continual_finetune": _continual_finetune}


def read_batches(path: Path, task: str) -> list[tuple[torch.Tensor, int]]:
    """The batches of ``task`` in ``path`` as a list of (image, label) examples, in the drawn order."""
    from safetensors.torch import load_file

    saved = load_file(str(path))
    n = len({k.split("/")[1] for k in saved if k.startswith(f"{task}/")})
    if n == 0:
        raise ValueError(f"{path} holds no batches of task {task!r}; write them with write_batches")
    out = []
    for i in range(n):
        x, y = saved[f"{task}/{i}/inputs"], saved[f"{task}/{i}/labels"]
        out += [(x[j], int(y[j])) for j in range(len(y))]
    return out


HEADS = "heads.safetensors"  #: zero-shot heads (logit scale folded in) + ``_projection_`` of θ₀


def write_heads(arch: str, tasks: int, path: Path) -> None:
    """Our synthetic zero-shot heads per task and θ₀'s visual projection, for FusionBench's
    ``compute_logits`` (its ``logit_scale_exp`` then 1, as parity's reference does)."""
    from safetensors.torch import save_file

    from otmf_exp.offline.synthetic import SyntheticBackbone

    bb = SyntheticBackbone(arch, "cpu")
    out = {t: bb.zero_shot_head(bb.task_data(t)).contiguous() for t in model_names(tasks)[1:]}
    out["_projection_"] = bb.module.visual_projection.weight.detach().contiguous()
    save_file(out, str(path))
