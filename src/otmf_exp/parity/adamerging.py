"""Parity rows: ``method=adamerging`` (task-wise, layer-wise, AdaMerging++) against FusionBench 0.2.33's
``CLIPTaskWiseAdaMergingAlgorithm`` / ``CLIPLayerWiseAdaMergingAlgorithm``, joint, on the digits8 zoo.

Also the our-side plumbing the data-driven rows share: the zoo's tower as a backbone, its heads, the
digits tasks, and data that records the batches our method draws (``Recorder``): each row's our side
runs first and writes those batches to ``work_dir``; the reference side serves them, in the same
order, through its own loader hook, so both sides see identical data.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import Tensor

from otmf_exp.parity.core import Case
from otmf_exp.parity.reference.adamerging import coefficients  # one definition, both sides

TASKS = ["rot90", "flip", "invert"]  # three of digits8's towers: a few seconds a row on one core
STEPS, BATCH = 20, 16


class Recorder:
    """A task's data whose ``batches``/``loader`` streams record every batch they serve (data unchanged)."""

    def __init__(self, data: Any) -> None:
        self.data, self.served = data, []

    def __getattr__(self, k: str) -> Any:
        return getattr(self.data, k)

    def _keep(self, it: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for b in it:
            self.served.append((b["inputs"], b["labels"]))
            yield b

    def batches(self, *a: Any, **k: Any) -> Iterator[dict[str, Any]]:
        return self._keep(self.data.batches(*a, **k))

    def loader(self, *a: Any, **k: Any) -> Iterator[dict[str, Any]]:
        return self._keep(self.data.loader(*a, **k))


@dataclass
class Setup:
    """Our side of a row: the zoo's θ₀ tower as a backbone, θ₀ (mergeable keys), heads, task data."""

    bb: Any
    pre: dict[str, Tensor]
    heads: dict[str, Tensor]
    datas: dict[str, Recorder] = field(default_factory=dict)
    zoo_dir: Path = Path()

    def task(self, i: int, name: str, weights: bool = True) -> Any:
        from otmf_exp.merging.base import TaskInput

        sd = load_file(str(self.zoo_dir / f"{name}.safetensors")) if weights else None
        w = {k: sd[k].to(self.pre[k].dtype) for k in self.pre} if sd is not None else None
        return TaskInput(name, i, w, self.heads[name], self.datas[name])

    def ctx(self, seed: int = 0, record: Any = None) -> Any:
        from otmf_exp.merging.base import MethodContext

        kw = {"record": record} if record is not None else {}
        return MethodContext(self.bb, torch.device("cpu"), torch.Generator(), progress=False, seed=seed, **kw)

    def save_batches(self, path: Path) -> None:
        """Every batch each task served, in order: ``<task>/<i>/x`` and ``<task>/<i>/y``."""
        out = {}
        for t, d in self.datas.items():
            for i, (x, y) in enumerate(d.served):
                out[f"{t}/{i}/x"], out[f"{t}/{i}/y"] = x.contiguous(), y.contiguous()
        save_file(out, str(path))


def setup(zoo_dir: Path, tasks: list[str], dtype: torch.dtype = torch.float32) -> Setup:
    """The exported zoo as our backbone (the same tower code as the runs) plus the digits tasks."""
    from otmf_exp.data.digits import build_task
    from otmf_exp.models.clip_vision import ClipVisionBackbone
    from otmf_exp.offline.tiny_clip import TinyRecipe, load_module

    class Tower(ClipVisionBackbone):  # task weights come from the zoo dir, not the cache
        def load_finetuned(self, task: str) -> Any:
            raise NotImplementedError

    meta = json.loads((zoo_dir / "config.json").read_text())
    module = load_module(TinyRecipe(**meta["recipe"]), load_file(str(zoo_dir / "pretrained.safetensors")))
    bb = Tower(module.to(dtype), "cpu")
    pre = {k: v.detach().clone() for k, v in module.named_parameters() if k in set(bb.mergeable_names())}
    heads = {k: v.to(dtype) for k, v in load_file(str(zoo_dir / "heads.safetensors")).items()}
    datas = {}
    for t in tasks:
        d = build_task(t)
        if dtype != torch.float32:
            d.splits = {s: (x.to(dtype), y) for s, (x, y) in d.splits.items()}
        datas[t] = Recorder(d)
    return Setup(bb, pre, heads, datas, zoo_dir)


@contextmanager
def float64_adaptation(module: Any) -> Iterator[None]:
    """In ``module`` (one importing them): λ created float64, not float32 (FusionBench's side is
    patched alike), and the entropy without its float32 cast of the logits (same formula,
    −Σ p log(p + eps)): the float64 rows then test the arithmetic alone."""
    from unittest import mock

    init = module.init_coefficients

    def init64(*a: Any, **k: Any) -> Tensor:
        return init(*a, **k).detach().double().requires_grad_(True)

    def entropy64(logits: Tensor, eps: float = 0.0) -> Tensor:
        p = torch.softmax(logits, dim=-1)
        return -(p * torch.log(p + eps)).sum(-1).mean()

    with (
        mock.patch.object(module, "init_coefficients", init64),
        mock.patch.object(module, "entropy_loss", entropy64),
    ):
        yield


def _adamerging(opts: dict[str, Any], key: str, dtype: torch.dtype = torch.float32):
    def ours(zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
        from otmf_exp.merging.adamerging import adamerging as am
        from otmf_exp.merging.adamerging.adamerging import AdaMerging, AdaMergingConfig

        if dtype == torch.float64:
            with float64_adaptation(am):
                return _ours(zoo_dir, work_dir, AdaMerging, AdaMergingConfig)
        return _ours(zoo_dir, work_dir, AdaMerging, AdaMergingConfig)

    def _ours(zoo_dir: Path, work_dir: Path, AdaMerging: Any, AdaMergingConfig: Any) -> dict[str, Tensor]:
        s = setup(zoo_dir, TASKS, dtype)
        cfg = OmegaConf.merge(OmegaConf.structured(AdaMergingConfig), {"steps": STEPS, "batch_size": BATCH})
        cfg = OmegaConf.merge(cfg, {"entropy_eps": 1e-8, **opts})  # FusionBench: −Σ p log(p + 1e-8)
        AdaMerging.validate(cfg)
        m = AdaMerging(cfg, s.ctx(), protocol="joint")
        m.trace = []
        state = m.joint(s.pre, [s.task(i, t) for i, t in enumerate(TASKS)])
        s.save_batches(work_dir / f"{key}.batches.safetensors")
        out = {f"weights/{k}": s.pre[k] + state.merged[k] for k in s.pre}
        out.update(coefficients(m.trace, list(s.pre), dtype))
        return out

    return ours


ours_task = _adamerging({"granularity": "task"}, "adamerging_task")
ours_layer = _adamerging({"granularity": "layer"}, "adamerging_layer")
ours_task64 = _adamerging({"granularity": "task"}, "adamerging_task64", torch.float64)
ours_layer64 = _adamerging({"granularity": "layer"}, "adamerging_layer64", torch.float64)
_PLUS = {"granularity": "layer", "tv_prune": "ties", "clamp": "merge"}
ours_plus = _adamerging(_PLUS, "adamerging_plus")
ours_plus64 = _adamerging(_PLUS, "adamerging_plus64", torch.float64)

REF = "otmf_exp.parity.reference.adamerging"
_SET = f"joint, 3 tasks ({', '.join(TASKS)}), {STEPS} Adam steps, batch {BATCH}, init 0.3, lr 1e-3"
_WHY32 = (
    "same batches (ours recorded, served to FusionBench's loader hook), entropy with FusionBench's 1e-8; "
    "float32 rounding of θ₀ + Σ λ_i τ_i summed in another order, amplified by {n} Adam steps "
    "(the float64 row agrees to rounding); layer-wise: λ of the k_proj.bias tensors left out (true gradient 0, "
    "Adam turns float noise into ±lr steps; the float64 row compares them)"
)
_WHY64 = (
    "the same run in float64 (towers, batches, λ on both sides, our entropy without its float32 cast): "
    "the arithmetic is the same; float32 λ/entropy would leave 3e-9 (task) / 1.5e-8 (layer)"
)
_WHY_PLUS = (
    "same batches, entropy with FusionBench's 1e-8, the same TIES trim and sign election (bit-equal task "
    "vectors); float32 rounding of θ₀ + Σ clamp(λ_i) τ_i summed in another order through 20 Adam steps: measured "
    "weights 1.2e-7 (1 ulp of a LayerNorm weight ~1), λ 6e-8 (k_proj.bias columns left out, as layer-wise); the "
    "float64 row agrees to 2.2e-16 with every column compared"
)
CASES: list[Case] = [
    Case("adamerging_task", "adamerging", f"granularity=task, {_SET}", "CLIPTaskWiseAdaMergingAlgorithm",
         "merged weights, λ after every step", 1e-5, _WHY32.format(n=STEPS), ours_task, f"{REF}:task"),
    Case("adamerging_task_f64", "adamerging", f"granularity=task, {_SET}, float64",
         "CLIPTaskWiseAdaMergingAlgorithm", "merged weights, λ after every step", 1e-10, _WHY64,
         ours_task64, f"{REF}:task64", "float64"),
    Case("adamerging_layer", "adamerging", f"granularity=layer, {_SET}", "CLIPLayerWiseAdaMergingAlgorithm",
         "merged weights, λ after every step", 1e-5, _WHY32.format(n=STEPS), ours_layer, f"{REF}:layer"),
    Case("adamerging_layer_f64", "adamerging", f"granularity=layer, {_SET}, float64",
         "CLIPLayerWiseAdaMergingAlgorithm", "merged weights, λ after every step", 1e-10, _WHY64,
         ours_layer64, f"{REF}:layer64", "float64"),
    Case("adamerging_plus", "adamerging_plus", f"tv_prune=ties (K 20 %, global), clamp=merge, layer, {_SET}",
         "TIES trim + elect (fusion_bench ties_merging_utils) + CLIPLayerWiseAdaMergingAlgorithm (clamp_weights)",
         "merged weights, λ after every step", 5e-7, _WHY_PLUS, ours_plus, f"{REF}:plus"),
    Case("adamerging_plus_f64", "adamerging_plus",
         f"tv_prune=ties (K 20 %, global), clamp=merge, layer, {_SET}, float64",
         "TIES trim + elect (fusion_bench ties_merging_utils) + CLIPLayerWiseAdaMergingAlgorithm (clamp_weights)",
         "merged weights, λ after every step", 1e-10, _WHY64, ours_plus64, f"{REF}:plus64", "float64"),
]  # fmt: skip
