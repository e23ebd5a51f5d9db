"""Merged weights of ``method=consensus`` / ``method=tsvm`` against the reference code, on an exported zoo.

Run with FusionBench 0.2.33's Python (it imports FusionBench's own functions and classes; ours are
imported from this checkout's ``src``)::

    .venv/bin/python -m otmf_exp.offline.zoo export /tmp/zoo
    OMP_NUM_THREADS=1 /work/fbvenv/bin/python scripts/compare/fusionbench_consensus_tsvm.py /tmp/zoo \
        --mingle-git PATH/TO/MINGLE [--order rot90,flip,...] [--out result.json]

``--mingle-git``: a clone (or bare git dir) of GitHub zihuanqiu/MINGLE; its ``HEAD`` is read.

Cases (the reference side only loads models and moves tensors; the arithmetic is the reference's):

* ``tsvm``: FusionBench ``TaskSingularVectorMerging(alpha=1)`` run on a ``BaseModelPool`` of the zoo;
  ``tsvm_alpha0.5_exclude_pos``: alpha 0.5 and the position embedding in ``exclude_keys``.
* ``consensus_joint``: FusionBench ``tall_mask/utils.py``: ``generate_task_masks`` on the flattened
  models (the TALL pipeline's τ_MTL = Σ τ_i), ``construct_consensus_mask`` (its mask loader, which
  reads files the pipeline never writes in a loadable form, is replaced by the masks just made),
  then task arithmetic θ₀ + λ·(τ_MTL ⊙ consensus) with λ 0.3, λ_t 0.6, k 2.
* ``consensus_joint_bug``: the same with FusionBench ``tall_mask/task_arithmetic.py``'s
  ``generate_task_masks`` (``method.fusionbench_mask_bug=true``).
* ``consensus_continual``: MINGLE's ``ContinualConsensusTAForCLIP`` (read from the MINGLE git
  mirror at run time, not vendored), its per-step merged models captured through its
  ``save_merged_model`` hook; defaults λ 0.1, λ_t 0.2, k 2, order as given.

Prints one line per case (max |Δw| over every parameter, and per continual step) and ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))


def load_zoo(zoo: Path, order: list[str] | None):
    """(θ₀, {task: θ_t}) as HF ``CLIPVisionModel`` objects, in ``order`` (default: the zoo's)."""
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = json.loads((zoo / "config.json").read_text())
    keep = set(CLIPVisionConfig().to_dict()) - {"transformers_version", "architectures", "dtype"}
    vcfg = CLIPVisionConfig(**{k: v for k, v in cfg["module_config"].items() if k in keep})

    def model(name: str) -> torch.nn.Module:
        m = CLIPVisionModel(vcfg)
        sd = {k: v for k, v in load_file(str(zoo / f"{name}.safetensors")).items() if k in m.state_dict()}
        m.load_state_dict(sd, strict=True)
        return m.eval()

    tasks = order or cfg["tasks"]
    return model("pretrained"), {t: model(t) for t in tasks}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:3]
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# ---- ours -------------------------------------------------------------------------------------------
def ours(method: str, protocol: str, pre: torch.nn.Module, models: dict, **opts) -> list[dict]:
    """Merged weights θ₀ + τᵐ after each step (one entry for joint)."""
    from omegaconf import OmegaConf

    from otmf_exp.merging import METHODS
    from otmf_exp.merging.base import MethodContext, TaskInput

    cls = METHODS[method]
    cfg = OmegaConf.structured(cls.Config(**opts))
    ctx = MethodContext(backbone=None, device=torch.device("cpu"), generator=torch.Generator())
    m = cls(cfg, ctx, protocol=protocol)
    theta0 = {k: v.detach().clone() for k, v in pre.state_dict().items()}
    tasks = [
        TaskInput(name=n, index=i, weights={k: v.detach().clone() for k, v in mod.state_dict().items()},
                  head=None, data=None, owned=True)
        for i, (n, mod) in enumerate(models.items())
    ]  # fmt: skip
    if protocol == "joint":
        return [m.merged(m.joint(theta0, tasks), theta0)]
    state, out = m.init(theta0), []
    for t in tasks:
        state = m.step(state, t, theta0)
        out.append(m.merged(state, theta0))
    return out


# ---- references ---------------------------------------------------------------------------------------
def ref_tsvm(pre, models, alpha=1, exclude_keys=None) -> dict:
    from fusion_bench.method import TaskSingularVectorMerging
    from fusion_bench.modelpool import BaseModelPool

    pool = BaseModelPool(models={"_pretrained_": copy.deepcopy(pre), **copy.deepcopy(models)})
    merged = TaskSingularVectorMerging(alpha=alpha, exclude_keys=exclude_keys).run(pool)
    return {k: v.detach() for k, v in merged.state_dict().items()}


def ref_consensus_joint(pre, models, lam=0.6, k=2, scaling=0.3, bug=False) -> dict:
    from fusion_bench.method.tall_mask import task_arithmetic as tall_ta
    from fusion_bench.method.tall_mask import utils as tall
    from fusion_bench.method.ties_merging.ties_merging_utils import state_dict_to_vector, vector_to_state_dict
    from fusion_bench.utils.state_dict_arithmetic import state_dict_sub, state_dict_sum

    ptm = {k_: v.detach().clone() for k_, v in pre.state_dict().items()}
    fts = [{k_: v.detach().clone() for k_, v in m.state_dict().items()} for m in models.values()]
    flat_ft = torch.vstack([state_dict_to_vector(sd) for sd in fts])
    flat_ptm = state_dict_to_vector(ptm)
    tv_flat = flat_ft - flat_ptm
    merged_tv = tv_flat.sum(dim=0)
    if bug:  # TALL-mask compression's own mask, on state dicts
        tvs = [state_dict_sub(sd, ptm) for sd in fts]
        multi = state_dict_sum(tvs)
        masks = [tall_ta.generate_task_masks(multi, tv, ptm, tall_mask_lambda=lam) for tv in tvs]
        masks = [{k_: v.bool() for k_, v in mk.items()} for mk in masks]
    else:
        flat_masks = tall.generate_task_masks(tv_flat, flat_ft, flat_ptm, tv=merged_tv, tall_mask_lambda=lam)
        masks = [vector_to_state_dict(mk, ptm) for mk in flat_masks]
    loaded = {f"task{i}": mk for i, mk in enumerate(masks)}
    tall.load_tall_mask = lambda remove_keys, ptm_check, config: loaded  # data plumbing: no mask files
    consensus = tall.construct_consensus_mask(ptm, k, None, [])
    masked = vector_to_state_dict(merged_tv * consensus, ptm)
    return {k_: ptm[k_] + scaling * masked[k_] for k_ in ptm}  # TaskVector.apply_to: θ₀ + coef·τ


def ref_consensus_continual(pre, models, mingle_git: Path, lam=0.2, k=2, scaling=0.1) -> list[dict]:
    src = subprocess.run(
        ["git", "-C", str(mingle_git), "show", "HEAD:fusion_bench/method/mingle/consensus_ta.py"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    mod = types.ModuleType("mingle_consensus_ta")
    exec(compile(src, "zihuanqiu/MINGLE:fusion_bench/method/mingle/consensus_ta.py", "exec"), mod.__dict__)
    from fusion_bench.modelpool import BaseModelPool

    steps: list[dict] = []

    class Algo(mod.ContinualConsensusTAForCLIP):
        log_dir = None  # no loggers: nothing written

        def save_merged_model(self, merged_model, step):  # capture each step's model
            steps.append({k_: v.detach().clone() for k_, v in merged_model.state_dict().items()})

    algo = Algo(scaling_factor=scaling, lmda=lam, k=k, shuffle_order=False, save_on_every_step=True)
    algo._program = types.SimpleNamespace(taskpool=types.SimpleNamespace(_test_datasets={}))
    pool = BaseModelPool(models={"_pretrained_": copy.deepcopy(pre), **copy.deepcopy(models)})
    algo.run(pool)
    return steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("zoo", type=Path)
    p.add_argument("--mingle-git", type=Path, required=True, help="a clone of github.com/zihuanqiu/MINGLE")
    p.add_argument("--order", help="comma-separated task order (default: the zoo's)")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    pre, models = load_zoo(a.zoo, a.order.split(",") if a.order else None)
    result: dict = {"order": list(models)}
    theta0 = dict(pre.state_dict())

    def report(name: str, mine: dict, ref: dict) -> None:
        d, size = max_diff(mine, ref), max_diff(ref, theta0)  # size: how far the reference moved θ₀
        result[name] = {"max_abs_dw": d, "max_abs_update": size}
        print(f"{name}: max |dw| = {d:.3e} (reference update max |theta - theta0| = {size:.3e})")

    report("tsvm", ours("tsvm", "joint", pre, models)[0], ref_tsvm(pre, models))
    opts = {"alpha": 0.5, "exclude_keys": ["vision_model.embeddings.position_embedding.weight"]}
    report(
        "tsvm_alpha0.5_exclude_pos",
        ours("tsvm", "joint", pre, models, **opts)[0],
        ref_tsvm(pre, models, **opts),
    )
    for name, bug in (("consensus_joint", False), ("consensus_joint_bug", True)):
        mine = ours("consensus", "joint", pre, models, fusionbench_mask_bug=bug)[0]
        report(name, mine, ref_consensus_joint(pre, models, bug=bug))
    mine = ours("consensus", "continual", pre, models)
    ref = ref_consensus_continual(pre, models, a.mingle_git)
    per_step = [max_diff(x, y) for x, y in zip(mine, ref, strict=True)]
    report("consensus_continual", mine[-1], ref[-1])
    result["consensus_continual"]["per_step_max_abs_dw"] = per_step
    print("consensus_continual per step: " + ", ".join(f"{x:.3e}" for x in per_step))
    print("RESULT " + json.dumps(result))
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
