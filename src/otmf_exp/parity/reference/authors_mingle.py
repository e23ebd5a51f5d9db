"""The reference side of the MINGLE rows of ``make parity-authors``: MINGLE's ``ContinualWEMoE``
(``fusion_bench/method/mingle/c_wemoe.py``) and ``MINGLE`` (``mingle.py``), their own ``run()`` loops,
fed what our side drew (``WORK/case.pt``).

Each runs in a child process (``python -m otmf_exp.parity.reference.authors_mingle NAME ZOO WORK``) with
the clone first on ``sys.path``, as the C. AdaMerging rows do: ``c_wemoe.py`` imports
``fusion_bench.utils.gpu_mem_context`` and ``mingle.py`` ``fusion_bench.models.lora_moe``, which
FusionBench 0.2.33 lacks, so MINGLE's fork of ``fusion_bench`` (its ``utils/timer.py``,
``models/lora_moe.py``, ``models/we_moe.py``) shadows the installed one. Replaced, as plumbing only: the
model pool (the zoo's towers, built before the run: their construction draws from the global RNG),
the task pool and classifier (the zoo's heads over the pre-trained projection, as
``authors_adamerging._Classifier``), the seed subset (our seed samples), the loader (the epochs of the
batches our side served), the draws of every new router row (``nn.init.normal_`` fills the new row from
the seed our row was drawn with; the old rows it also fills are overwritten by their code), evaluation
(skipped: the models are compared) and checkpoint saving (the model is captured instead).
"""

from __future__ import annotations

import os
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from otmf_exp.parity.reference.adamerging import pool
from otmf_exp.parity.reference.authors_adamerging import _child as child
from otmf_exp.parity.reference.authors_adamerging import _Classifier, _Epochs, child_main
from otmf_exp.parity.reference.zoo import Zoo

CPU = torch.device("cpu")
REPO = "MINGLE_REPO"


def _child(name: str, zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
    """Run ``name`` in a child process with the MINGLE clone first on the path; its tensors."""
    return child(name, zoo_dir, work_dir, module=__name__, repo=REPO)


def c_wemoe(zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
    return _child("c_wemoe", zoo_dir, work_dir)


def c_wemoe_f64(zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
    return _child("c_wemoe_f64", zoo_dir, work_dir)


def _from_fork(module: types.ModuleType) -> None:
    if "mingle" not in (module.__file__ or "").lower() or os.environ.get(REPO, "\0") not in module.__file__:
        raise RuntimeError(f"{module.__name__} came from {module.__file__}, not {REPO}")


def _plumbing(zoo: Zoo, case: dict, dtype: torch.dtype, consumed: list, current: dict):
    """The fabric, the task pool and the module globals of a MINGLE algorithm module, replaced."""
    fabric = types.SimpleNamespace(device=CPU, to_device=lambda x: x, _loggers=[], is_global_zero=True)
    tasks = case["tasks"]
    taskpool = types.SimpleNamespace(
        _test_datasets={n: n for n in tasks}, test_datasets={n: n for n in tasks}, setup=lambda: None,
        clip_model=types.SimpleNamespace(), processor=None, fabric=fabric, evaluate=lambda model: {},
    )  # fmt: skip
    _Classifier.heads = {n: zoo.heads[n].to(dtype) for n in tasks}
    _Classifier.projection = zoo.pretrained["visual_projection.weight"]
    batch = case["batch_size"]

    def seed_subset(dataset: str, k: int) -> list:  # the dataset is the task's name (test_datasets)
        current["task"] = dataset
        return [(x, 0) for x in case["seeds"][dataset]]

    def loader(dataset: Any, **kw: Any) -> _Epochs:  # the epochs of the batches our side served
        per_epoch = -(-len(dataset) // batch)
        b = case["served"][current["task"]]
        return _Epochs([b[i : i + per_epoch] for i in range(0, len(b), per_epoch)], current["task"], consumed)

    return fabric, taskpool, seed_subset, loader


def _logits(model: Any, case: dict, step: int) -> dict[str, Tensor]:
    clf = _Classifier(types.SimpleNamespace(vision_model=model))
    with torch.no_grad():
        return {
            f"logits/{step}/{u}": clf(case["eval"][u], task_name=u)["logits"] for u in case["tasks"][:step]
        }


def _seeded_rows(plan: Any):
    """``nn.init.normal_`` whose last row is drawn from the next seed of ``plan`` (our row's seed)."""

    def normal_(t: Tensor, mean: float = 0.0, std: float = 1.0, generator: Any = None) -> Tensor:
        torch.manual_seed(next(plan))
        with torch.no_grad():
            t[-1:].normal_(mean, std)
        return t

    return normal_


def _in_dtype(case: dict, dtype: torch.dtype) -> dict:
    """The case's images (eval, seed samples, served batches) in ``dtype``; batch size 16."""
    return {**case, "batch_size": 16, "eval": {k: v.to(dtype) for k, v in case["eval"].items()},
            "seeds": {k: v.to(dtype) for k, v in case["seeds"].items()},
            "served": {k: [x.to(dtype) for x in v] for k, v in case["served"].items()}}  # fmt: skip


def _c_wemoe(zoo: Zoo, case: dict, dtype: torch.dtype) -> dict[str, Tensor]:
    from fusion_bench.method.mingle import c_wemoe as ref

    _from_fork(ref)
    torch.set_default_dtype(dtype)  # their gates are nn.Linear of the default dtype
    tasks, blocks = case["tasks"], case["blocks"]
    case, consumed, current, out = _in_dtype(case, dtype), [], {}, {}
    fabric, taskpool, seed_subset, loader = _plumbing(zoo, case, dtype, consumed, current)
    pre = zoo.pretrained

    def routers(model: Any, prefix: str) -> dict[str, Tensor]:
        r = {}
        for name, layer in zip(blocks, model.vision_model.encoder.layers, strict=True):
            fc = layer.mlp.gate.fc
            r[f"{prefix}/{name}/router.w"], r[f"{prefix}/{name}/router.b"] = fc.weight.detach().clone(), fc.bias.detach().clone()  # fmt: skip
        return r

    class Plumbed(ref.ContinualWEMoE):
        log_dir = tempfile.mkdtemp()
        tensorboard_summarywriter = types.SimpleNamespace(add_text=lambda *a, **k: None)

        def test_time_adaptation(self, model, task_model, model_name, seed_sample_number=None):
            out.update(routers(model, f"init/{tasks.index(model_name) + 1}"))
            return super().test_time_adaptation(model, task_model, model_name, seed_sample_number)

        def save_merged_model(self, model, step):  # their per-step save: capture instead
            t = step + 1
            out.update(routers(model, f"router/{t}"))
            sd = model.state_dict()
            out.update(
                {f"weights/{t}/{k}": (sd[k] if k in sd else pre[k]).detach().clone() for k in case["keys"]}
            )
            out.update(_logits(model, case, t))

    algo = Plumbed(
        init_lambda=0.3, router_hidden_layers=1, seed_sample_number=5, max_steps=case["steps"], batch_reduce=True,
        shuffle_order=False, seed=None, use_tta=True, save_on_every_step=True, evaluate_on_every_step=False,
        lr=1e-4, batch_size=16, fast_dev_run=False,
    )  # fmt: skip
    algo._fabric_instance, algo._program = fabric, types.SimpleNamespace(taskpool=taskpool)
    ref.HFCLIPClassifier = _Classifier
    ref.get_classnames_and_templates = lambda name: ([], [])
    ref.select_seed_subset, ref.DataLoader = seed_subset, loader
    models = pool(zoo, tasks, dtype)  # built before the seeded draws below
    plan = iter([s for per_step in case["router_seeds"] for s in per_step])
    torch.nn.init.normal_ = _seeded_rows(plan)
    final = algo.run(models)
    for name, layer in zip(blocks, final.vision_model.encoder.layers, strict=True):
        for e, lm in enumerate(layer.mlp.task_vectors):
            out[f"expert/{name}.fc1/{e}"] = lm.lora1.get_delta().detach()
            out[f"expert/{name}.fc2/{e}"] = lm.lora2.get_delta().detach()
    seen: dict[str, int] = {}
    for name, x in consumed:
        out[f"batch/{name}/{seen.setdefault(name, 0):04d}"] = x.clone()
        seen[name] += 1
    return out


def sign_fixed(u: Tensor) -> Tensor:
    """``u`` with each column's sign chosen so its largest-magnitude entry is positive: the subspace's
    basis up to the signs an SVD or eigensolver is free to pick (the projection does not see them)."""
    idx = u.abs().argmax(dim=0)
    sign = torch.sign(u.gather(0, idx[None]))
    return (u * torch.where(sign == 0, torch.ones_like(sign), sign)).contiguous()


def mingle(zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
    return _child("mingle", zoo_dir, work_dir)


def mingle_f64(zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
    return _child("mingle_f64", zoo_dir, work_dir)


def _gate_rows(gens: list) -> Any:
    """``nn.init.normal_`` for MINGLE's gates: a step's trainable row (``trainable_fc``) is drawn from our
    generator of that step, in site order as ours; ``frozen_fc`` (overwritten by the old rows) as before."""
    real = torch.nn.init.normal_
    state = {"step": 0}

    def normal_(t: Tensor, mean: float = 0.0, std: float = 1.0, generator: Any = None) -> Tensor:
        if state.get("frozen"):  # add_expert's frozen_fc, drawn first: their code copies the old rows over it
            state["frozen"] = False
            return real(t, mean, std)
        with torch.no_grad():
            return t.normal_(mean, std, generator=gens[state["step"]])

    return normal_, state


class _TaskClassifier(_Classifier):
    """``_Classifier`` that, called without ``task_name`` (MINGLE's covariance pass), uses the head of
    the task it was last called for (HFCLIPClassifier: the task of ``set_classification_task``)."""

    last: str | None = None

    def __call__(self, images, return_image_embeds=False, return_dict=True, task_name=None):
        _TaskClassifier.last = task_name = task_name or _TaskClassifier.last
        return super().__call__(images, return_image_embeds, return_dict, task_name)


def _mingle(zoo: Zoo, case: dict, dtype: torch.dtype) -> dict[str, Tensor]:
    from fusion_bench.method.mingle import mingle as ref
    from fusion_bench.models import lora_moe

    _from_fork(ref)
    _from_fork(lora_moe)
    torch.set_default_dtype(dtype)  # their gates and LoRA factors are built in the default dtype
    tasks, sites = case["tasks"], case["sites"]
    case, consumed, current, out = _in_dtype(case, dtype), [], {}, {}
    fabric, taskpool, seed_subset, loader = _plumbing(zoo, case, dtype, consumed, current)
    steps = case["steps"]
    gens = [torch.Generator().manual_seed(s) for s in case["gate_seeds"]]
    normal_, draw = _gate_rows(gens)
    real_gate = lora_moe.construct_weight_ensembling_gate

    def construct(hidden, num_old, num_new, init_lambda, freeze_old=True):
        draw["frozen"] = num_old > 0
        return real_gate(hidden, num_old, num_new, init_lambda, freeze_old)

    lora_moe.construct_weight_ensembling_gate = construct

    def loader_with_cov(dataset: Any, **kw: Any) -> _Epochs:
        """The TTA epochs our side served, then the covariance pass: ``tqdm.auto`` (its asyncio class)
        calls ``iter()`` once in its constructor and iterates a second one, so that epoch is offered twice."""
        per_epoch = -(-len(dataset) // case["batch_size"])
        b = case["served"][current["task"]]
        tta, cov = b[:steps], b[steps:]
        epochs = [tta[i : i + per_epoch] for i in range(0, len(tta), per_epoch)] + [cov, cov]
        return _Epochs(epochs, current["task"], consumed)

    def moes(model: Any) -> dict[str, Any]:
        return {n: model.get_submodule(n) for n in sites}

    class Plumbed(ref.MINGLE):
        log_dir = tempfile.mkdtemp()

        def test_time_adaptation(self, model, task_model, model_name, seed_sample_number=None):
            t = tasks.index(model_name) + 1
            for n, mod in moes(model).items():
                fc = mod.gate.trainable_fc
                out[f"init/{t}/{n}/w"], out[f"init/{t}/{n}/b"] = (
                    fc.weight.detach().clone(),
                    fc.bias.detach().clone(),
                )
            return super().test_time_adaptation(model, task_model, model_name, seed_sample_number)

        def save_merged_model(self, model, step):  # their per-step save: capture instead
            t = step + 1
            draw["step"] = t  # the next step's gate rows
            for n, mod in moes(model).items():
                g = mod.gate
                w, b = g.trainable_fc.weight, g.trainable_fc.bias
                if g.frozen_fc is not None:
                    w, b = torch.cat([g.frozen_fc.weight, w]), torch.cat([g.frozen_fc.bias, b])
                out[f"gate/{t}/{n}/w"], out[f"gate/{t}/{n}/b"] = w.detach().clone(), b.detach().clone()
                out[f"subspace/{t}/{n}"] = sign_fixed(mod.U.to(dtype))
            sd = {k.replace(".base_model.", "."): v for k, v in model.state_dict().items()}
            out.update({f"weights/{t}/{k}": sd[k].detach().clone() for k in case["keys"] if k in sd})
            out.update(_logits(model, case, t))

    algo = Plumbed(
        shuffle_order=False, seed=None, save_on_every_step=True, evaluate_on_every_step=False,
        save_gate_state=False, constraint_gate=True, lora_layer=["attn", "mlp"], batch_reduce=True, lr=1e-4,
        batch_size=16, max_steps=steps, seed_sample_number=5, lora_r=64, subspace_k=3, gamma=1, beta=0.99,
        fast_dev_run=False,
    )  # fmt: skip
    algo._fabric_instance, algo._program = fabric, types.SimpleNamespace(taskpool=taskpool)
    ref.HFCLIPClassifier = _TaskClassifier
    ref.get_classnames_and_templates = lambda name: ([], [])
    ref.select_seed_subset, ref.DataLoader = seed_subset, loader_with_cov
    models = pool(zoo, tasks, dtype)  # built before the seeded draws below
    torch.nn.init.normal_ = normal_
    final = algo.run(models)
    for n, mod in moes(final).items():
        for e, lora in enumerate(mod.task_vectors):
            out[f"expert/{n}/{e}"] = lora.get_delta().detach()
    seen: dict[str, int] = {}
    for name, x in consumed:
        out[f"batch/{name}/{seen.setdefault(name, 0):04d}"] = x.clone()
        seen[name] += 1
    return out


def main(argv: list[str]) -> int:
    """The child process: ``NAME ZOO WORK`` → ``WORK/theirs.child.safetensors``."""
    f32, f64 = torch.float32, torch.float64
    runs = {"c_wemoe": (_c_wemoe, f32), "c_wemoe_f64": (_c_wemoe, f64), "mingle": (_mingle, f32),
            "mingle_f64": (_mingle, f64)}  # fmt: skip
    return child_main(argv, runs)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
