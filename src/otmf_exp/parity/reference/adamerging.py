"""FusionBench 0.2.33's AdaMerging (task-wise, layer-wise, with TIES-pruned task vectors) on the zoo,
fed the batches our side recorded; also the FusionBench-side plumbing the other reference rows share."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from otmf_exp.parity.reference.zoo import Zoo

TASKS = ["rot90", "flip", "invert"]  # = otmf_exp.parity.adamerging.TASKS (this side imports no otmf_exp)
STEPS, BATCH = 20, 16


class Pool:
    """The part of a FusionBench model pool the algorithms use: names, ``load_model``, a config."""

    def __init__(self, models: dict[str, nn.Module]) -> None:
        self.models = models

    @property
    def model_names(self) -> list[str]:
        return [n for n in self.models if n != "_pretrained_"]

    @property
    def has_pretrained(self) -> bool:
        return "_pretrained_" in self.models

    def load_model(self, name: str, *a: Any, **k: Any) -> nn.Module:
        return deepcopy(self.models[name])

    def load_pretrained_model(self, *a: Any, **k: Any) -> nn.Module:
        return self.load_model("_pretrained_")


def pool(zoo: Zoo, tasks: list[str], dtype: torch.dtype = torch.float32) -> Pool:
    return Pool(
        {
            "_pretrained_": zoo.tower("pretrained", dtype=dtype),
            **{t: zoo.tower(t, dtype=dtype) for t in tasks},
        }
    )


def served(work_dir: Path, key: str, tasks: list[str], dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Per task, an iterator over the (images, labels) batches our side drew, in order."""
    b = load_file(str(work_dir / f"{key}.batches.safetensors"))
    out = {}
    for t in tasks:
        n = len({k.split("/")[1] for k in b if k.startswith(f"{t}/")})
        out[t] = iter([(b[f"{t}/{i}/x"].to(dtype), b[f"{t}/{i}/y"]) for i in range(n)])
    return out


def fabric():
    import lightning as L

    f = L.Fabric(accelerator="cpu", devices=1)
    f.launch()
    return f


def heads_setup(algo: Any, zoo: Zoo, tasks: list[str], dtype: torch.dtype = torch.float32):
    """FusionBench's zero-shot heads = the zoo's (logit scale folded in) over the pre-trained projection."""

    def setup(*a: Any, **k: Any) -> None:
        algo.zeroshot_weights = {t: zoo.heads[t].to(dtype) for t in tasks}
        algo.visual_projection = zoo.projection(dtype)
        algo.logit_scale_exp = torch.tensor(1.0, dtype=dtype)

    return setup


def weights(model: nn.Module) -> dict[str, Tensor]:
    return {
        k if k.startswith("vision_model.") else f"vision_model.{k}": v.detach().clone()
        for k, v in model.state_dict().items()
    }


def _config(**kw: Any):
    from omegaconf import DictConfig

    base = dict(name="adamerging", weights=None, optimizer="adam", lr=1e-3, init_values=0.3, clamp_weights=False,
                tie_weights=True, strict=False, devices=1, batch_size=BATCH, num_workers=0, max_steps=STEPS,
                fast_dev_run=False, save_merging_weights=False, cache_dir="outputs")  # fmt: skip
    return DictConfig({**base, **kw})


def algorithm(
    granularity: str,
    heads: Any,
    tasks: list[str],
    streams: dict[str, Any],
    dtype: torch.dtype = torch.float32,
    plus: bool = False,
) -> Any:
    """FusionBench's task- or layer-wise AdaMerging class with the rows' settings (``_config``), fed
    ``streams`` (per task, the batches our side drew) and ``heads`` (``.heads``, ``.projection(dtype)``:
    a :class:`Zoo` or bench-peer's synthetic heads): the plumbing parity and bench-peer share."""
    if granularity == "task":
        from fusion_bench.method.adamerging.clip_task_wise_adamerging import (
            CLIPTaskWiseAdaMergingAlgorithm as A,
        )
    else:
        from fusion_bench.method.adamerging.clip_layer_wise_adamerging import (
            CLIPLayerWiseAdaMergingAlgorithm as A,
        )
    algo = A(_config(clamp_weights=plus))
    f = fabric()
    if granularity == "task":
        algo._fabric = f
    else:
        algo._fabric_instance = f
        algo.log_hyperparams = lambda *a, **k: None
        algo.fabric.log_dict = lambda *a, **k: None
    algo.on_test_time_adaptation_start = heads_setup(algo, heads, tasks, dtype)
    algo.get_shuffled_test_loader_iter = lambda task: streams[task]
    return algo


@contextmanager
def float64_coefficients(dtype: torch.dtype) -> Iterator[None]:
    """For a float64 row, FusionBench's λ made float64 while it runs (it creates them float32, as we do);
    restored after, so the runner's later float32 rows get FusionBench's own."""
    import fusion_bench.method.adamerging.layer_wise_adamerging as lw
    import fusion_bench.method.adamerging.task_wise_adamerging as tw

    patched = ((tw, "get_task_wise_weights"), (lw, "get_layer_wise_weights"))
    saved = [getattr(mod, name) for mod, name in patched]
    if dtype == torch.float64:
        for (mod, name), fn in zip(patched, saved):
            setattr(mod, name, lambda *a, _fn=fn, **k: _fn(*a, **k).detach().double())
    try:
        yield
    finally:
        for (mod, name), fn in zip(patched, saved):
            setattr(mod, name, fn)


def _run(zoo_dir: Path, work_dir: Path, key: str, granularity: str, dtype: torch.dtype, plus: bool = False):
    zoo = Zoo(zoo_dir)
    p = pool(zoo, TASKS, dtype)
    if plus:
        p = ties_pruned(p)
    trace: list[Tensor] = []
    clamp = (lambda c: c.clamp(0, 1)) if plus else (lambda c: c)
    algo = algorithm(granularity, zoo, TASKS, served(work_dir, key, TASKS, dtype), dtype, plus)
    tta = algo.test_time_adaptation

    def traced(module):
        opt_step = torch.optim.Adam.step

        def step(self, *a, **k):
            out = opt_step(self, *a, **k)
            trace.append(clamp(self.param_groups[0]["params"][0].detach().clone()))
            return out

        torch.optim.Adam.step = step
        try:
            return tta(module)
        finally:
            torch.optim.Adam.step = opt_step

    algo.test_time_adaptation = traced
    with float64_coefficients(dtype):
        merged = algo.run(p)
    out = {f"weights/{k}": v for k, v in weights(merged).items()}
    keys = [k for k, q in p.models["_pretrained_"].named_parameters() if q.requires_grad]
    out.update(
        coefficients(
            trace, [k if k.startswith("vision_model.") else f"vision_model.{k}" for k in keys], dtype
        )
    )
    return out


ZERO_GRAD = ".k_proj.bias"  # softmax ignores it: true gradient 0, Adam turns float noise into ±lr steps


def coefficients(trace: list[Tensor], keys: list[str], dtype: torch.dtype) -> dict[str, Tensor]:
    """λ after every Adam step: ``coef/step<i>`` (task-wise) or ``coef/step<i>/<key>`` (layer-wise, one
    column per tensor); in float32 the ``k_proj.bias`` columns are left out (see ``ZERO_GRAD``). Our side
    imports it from here, so both sides name their columns by one rule."""
    out = {}
    for i, c in enumerate(trace):
        if c.dim() == 1:
            out[f"coef/step{i}"] = c
            continue
        for j, k in enumerate(keys):
            if dtype == torch.float64 or not k.endswith(ZERO_GRAD):
                out[f"coef/step{i}/{k}"] = c[:, j]
    return out


def ties_pruned(p: Pool, density: float = 0.2) -> Pool:
    """AdaMerging++'s task models: θ₀ + the TIES-trimmed, sign-elected task vectors (flat over sorted keys)."""
    from fusion_bench.method.ties_merging.ties_merging_utils import (
        state_dict_to_vector,
        ties_merging_split,
        vector_to_state_dict,
    )

    pre = p.models["_pretrained_"].state_dict()
    tvs = [{k: v - pre[k] for k, v in p.models[n].state_dict().items()} for n in p.model_names]
    flat = torch.vstack([state_dict_to_vector(tv) for tv in tvs])
    selected, _ = ties_merging_split(flat, reset_thresh=density * 100, merge_func="sum")
    models = {"_pretrained_": p.models["_pretrained_"]}
    for n, row, tv in zip(p.model_names, selected, tvs):
        m = deepcopy(p.models["_pretrained_"])
        sd = vector_to_state_dict(row, tv)
        m.load_state_dict({k: pre[k] + sd[k] for k in pre})
        models[n] = m
    return Pool(models)


def task(zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
    return _run(zoo_dir, work_dir, "adamerging_task", "task", torch.float32)


def layer(zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
    return _run(zoo_dir, work_dir, "adamerging_layer", "layer", torch.float32)


def task64(zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
    return _run(zoo_dir, work_dir, "adamerging_task64", "task", torch.float64)


def layer64(zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
    return _run(zoo_dir, work_dir, "adamerging_layer64", "layer", torch.float64)


def plus(zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
    return _run(zoo_dir, work_dir, "adamerging_plus", "layer", torch.float32, plus=True)


def plus64(zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
    return _run(zoo_dir, work_dir, "adamerging_plus64", "layer", torch.float64, plus=True)
