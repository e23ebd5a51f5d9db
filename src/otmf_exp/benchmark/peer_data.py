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
        return _adaptation_batches(method, cfg, ctx, arch, model_names(tasks)[1:], path, sizes)
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


def _adamerging(cfg: Any, ctx: Any, datas: list) -> tuple[list, dict | None]:
    """Joint AdaMerging: its own streams (``batch_streams``, key ``("joint",)``, as ``joint`` builds
    them), one batch per task per step."""
    from otmf_exp.merging.adamerging.adamerging_pools import batch_streams

    return [(s, cfg.steps) for s in batch_streams(cfg, ctx, datas, ("joint",), [0] * len(datas))], None


def _concrete(cfg: Any, ctx: Any, datas: list) -> tuple[list, dict | None]:
    """Joint Concrete: its streams (``joint``'s seeds), one batch per task per entropy (task_arithmetic:
    one per mask step; adamerging: two per mask step, inner and mask, then one per AdaMerging step);
    the spec holds our mask generator's seed, which parity's reference sets FusionBench's global RNG to."""
    n = cfg.max_steps if cfg.merge == "task_arithmetic" else 2 * cfg.max_steps + cfg.max_adamerging_steps
    seed = ctx.seed_for
    streams = [
        d.batches(cfg.adapt_split, cfg.batch_size, seed("concrete", "data", j)) for j, d in enumerate(datas)
    ]
    return [(s, n) for s in streams], {"mask_seed": seed("concrete", "mask")}


def _continual_finetune(cfg: Any, ctx: Any, datas: list) -> tuple[list, dict | None]:
    """Continual fine-tuning: step t's stream of task t (``step``'s seed), ``steps`` batches each; the
    spec holds the settings parity's reference takes (tasks in order, steps, batch size, lr, LoRA)."""
    seed = ctx.seed_for
    streams = [
        (d.batches(cfg.split, cfg.batch_size, seed("continual_finetune", t, "batches")), cfg.steps)
        for t, d in enumerate(datas, start=1)
    ]
    spec = {"batch_size": cfg.batch_size, "lr": cfg.lr, "lora": cfg.lora.enabled}
    return streams, {"tasks": [d.name for d in datas], "steps": cfg.steps, **spec}


#: methods whose batches their own streams draw (not ``example_batches``): ``(cfg, ctx, datas)`` ->
#: ``[(stream, batches drawn from it)]`` in the method's draw order, and the spec its reference reads
ADAPTATION = {"adamerging": _adamerging, "concrete": _concrete, "continual_finetune": _continual_finetune}


def _adaptation_batches(
    method: str, cfg: Any, ctx: Any, arch: str, tasks: list[str], path: Path, sizes: dict
) -> int:
    """The batches of an :data:`ADAPTATION` method, recorded as drawn (parity's ``Recorder``), saved in
    parity's layout (``<task>/<i>/x|y``, read back by its ``served``), the spec beside them as
    ``<row>.spec.json``; returns how many batches in all."""
    import json

    from otmf_exp.offline.synthetic import ARCHS, SyntheticTaskData
    from otmf_exp.parity.adamerging import Recorder, Setup

    datas = {t: Recorder(SyntheticTaskData(t, ARCHS[arch]["image_size"], sizes=sizes)) for t in tasks}
    streams, spec = ADAPTATION[method](cfg, ctx, list(datas.values()))
    for _ in range(max(n for _, n in streams)):  # one batch per stream in turn, as the methods draw
        for s, n in streams:
            if n:
                next(s)
        streams = [(s, n - 1) for s, n in streams]
    Setup(None, {}, {}, datas).save_batches(path)
    if spec is not None:
        path.with_name(path.name.replace(".batches.safetensors", ".spec.json")).write_text(json.dumps(spec))
    return sum(len(d.served) for d in datas.values())


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
