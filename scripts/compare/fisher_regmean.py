"""Side by side: our ``fisher`` / ``regmean`` vs FusionBench 0.2.33's own code, same models, same batches.

Two stages on an exported digits8 zoo (``python -m otmf_exp.offline.zoo export ZOO``):

    .venv/bin/python scripts/compare/fisher_regmean.py ours ZOO OUT.pt [--seed 0]
    PYTHONPATH=src /work/fbvenv/bin/python scripts/compare/fisher_regmean.py reference ZOO OUT.pt

``ours`` runs our methods (defaults: 256 train examples, batch 32, seeded shuffle) on the zoo's
models and saves, per task, the exact batches each method consumed, plus our Fishers, Grams and
merged weights. ``reference`` loads the exported towers into transformers' ``CLIPVisionModel``
(FusionBench's model class) and drives FusionBench's own functions on those batches:
``FisherMergingForCLIPVisionModel.get_fisher_weights`` (its loader does not shuffle: fed our
batches in order) + ``merging_with_fisher_weights``; ``RegMeanAlgorithmForCLIP.get_regmean_weights``
(its loader's ``shuffle=True`` turned off so it sees our batches) + ``merging_with_regmean_weights``.
The zero-shot head is ours with the logit scale folded in (logit_scale_exp = 1), as FusionBench's
``text_embeds @ image_embeds.T * logit_scale_exp``. Prints max |Δ| of Fishers, Grams and merged weights, and of our merge step alone run on
FusionBench's Fishers/Grams (``PYTHONPATH=src``: our merging modules are pure torch).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def ours(zoo_dir: Path, out: Path, seed: int) -> None:
    from safetensors.torch import load_file

    from otmf_exp.data.base import example_batches
    from otmf_exp.data.digits import build_task
    from otmf_exp.merging.base import MethodContext, TaskInput
    from otmf_exp.merging.fisher_regmean.fisher import Fisher, FisherConfig
    from otmf_exp.merging.fisher_regmean.regmean import RegMean, RegMeanConfig
    from otmf_exp.offline.zoo import DigitsZoo

    cfg = json.loads((zoo_dir / "config.json").read_text())
    zoo = DigitsZoo(progress=False)
    from otmf_exp.models.tiny import TinyBackbone

    bb = TinyBackbone(zoo, "cpu")
    heads = load_file(str(zoo_dir / "heads.safetensors"))
    pre = bb.pretrained_state()
    exported = load_file(str(zoo_dir / "pretrained.safetensors"))
    assert all(torch.equal(pre[k], exported[k]) for k in pre), "the zoo cache differs from the export"
    result: dict = {"tasks": cfg["tasks"], "batches": {}, "fisher": {}, "gram": {}, "merged": {}}
    for name, cls, conf in (("fisher", Fisher, FisherConfig()), ("regmean", RegMean, RegMeanConfig())):
        ctx = MethodContext(
            bb, torch.device("cpu"), torch.Generator().manual_seed(seed), progress=False, seed=seed
        )
        method = cls(conf, ctx, protocol="joint")
        datas = {t: build_task(t) for t in cfg["tasks"]}
        result["batches"][name] = {}
        for t in cfg["tasks"]:  # the batches the method draws (same seed, same stream)
            s = ctx.seed_for(name, t)
            bs = list(
                example_batches(
                    datas[t], conf.split, conf.num_examples, conf.batch_size, shuffle=True, seed=s
                )
            )
            result["batches"][name][t] = [(b["inputs"], b["labels"]) for b in bs]
            theta = load_file(str(zoo_dir / f"{t}.safetensors"))
            theta = {k: theta[k] for k in pre}
            if name == "fisher":
                result["fisher"][t] = method.fisher(theta, heads[t], iter(bs), t)
            else:
                result["gram"][t] = method.grams(theta, iter(bs), t)
        tasks = [
            TaskInput(
                t, i, {k: load_file(str(zoo_dir / f"{t}.safetensors"))[k] for k in pre}, heads[t], datas[t]
            )
            for i, t in enumerate(cfg["tasks"])
        ]
        state = method.joint(pre, iter(tasks))
        result["merged"][name] = {k: pre[k] + state.merged[k] for k in pre}
    torch.save(result, out)
    print(f"saved {out}")


class _Fabric:
    """Identity stand-in for Lightning Fabric (one CPU process: nothing to wrap)."""

    _loggers = None

    def setup_dataloaders(self, loader):
        return loader

    def setup(self, model):
        return model


def _towers(zoo_dir: Path, cfg: dict):
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    mc = {
        k: v
        for k, v in cfg["module_config"].items()
        if k in CLIPVisionConfig().to_dict() and k != "transformers_version"
    }
    vcfg = CLIPVisionConfig(**mc)
    proj_w = load_file(str(zoo_dir / "pretrained.safetensors"))["visual_projection.weight"]
    proj = torch.nn.Linear(proj_w.shape[1], proj_w.shape[0], bias=False)
    proj.weight.data.copy_(proj_w)
    proj.requires_grad_(False)

    def load(name: str) -> CLIPVisionModel:
        m = CLIPVisionModel(vcfg)
        sd = load_file(str(zoo_dir / f"{name}.safetensors"))
        missing, unexpected = m.load_state_dict(
            {k: v for k, v in sd.items() if k.startswith("vision_model.")}, strict=False
        )
        assert not missing, missing
        return m.eval()

    return load, proj


def _maxdiff(a: dict, b: dict) -> tuple[float, str]:
    worst = max(a, key=lambda k: float((a[k].float() - b[k].float()).abs().max()))
    return float((a[worst].float() - b[worst].float()).abs().max()), worst


def reference(zoo_dir: Path, out: Path) -> None:
    import fusion_bench.method.regmean.clip_regmean as clip_regmean
    from fusion_bench.method.fisher_merging.clip_fisher_merging import FisherMergingForCLIPVisionModel
    from fusion_bench.method.fisher_merging.fisher_merging import merging_with_fisher_weights
    from fusion_bench.method.regmean.clip_regmean import RegMeanAlgorithmForCLIP
    from fusion_bench.method.regmean.regmean import merging_with_regmean_weights
    from fusion_bench.method.regmean.utils import get_modules_to_merge
    from omegaconf import DictConfig
    from safetensors.torch import load_file

    from otmf_exp.merging.fisher_regmean.fisher import FisherAccumulator  # needs PYTHONPATH=src: pure torch
    from otmf_exp.merging.fisher_regmean.regmean import RegMeanAccumulator, reduce_non_diagonal
    from otmf_exp.merging.task_vectors import global_norm

    cfg = json.loads((zoo_dir / "config.json").read_text())
    ours_ = torch.load(out, weights_only=False)
    load, proj = _towers(zoo_dir, cfg)
    heads = load_file(str(zoo_dir / "heads.safetensors"))
    tasks = cfg["tasks"]
    dl = DictConfig({"batch_size": 32, "num_workers": 0})
    report: dict = {}

    def setup(alg):
        alg._fabric_instance = _Fabric()
        alg._clip_processor = lambda x: x  # our batches are already tensors
        alg.visual_projection = proj
        alg.logit_scale_exp = torch.tensor(1.0)  # our heads carry the logit scale
        alg.zeroshot_weights = dict(heads)

    def dataset(batches):
        return [(x[i], int(y[i])) for x, y in batches for i in range(len(y))]

    # ---- Fisher ----
    fb = FisherMergingForCLIPVisionModel(
        exclude_param_names_regex=[],
        normalize_fisher_weight=True,
        minimal_fisher_weight=1e-6,
        num_fisher_examples=256,
        dataloader_kwargs=dl,
    )
    setup(fb)
    params, fishers = {}, []
    for t in tasks:
        model = load(t)
        names = list(model.state_dict().keys())
        for k, v in model.state_dict().items():
            params.setdefault(k, []).append(v.detach().clone())
        f = fb.get_fisher_weights(t, model, dataset(ours_["batches"]["fisher"][t]), names)
        fishers.append(f)
        d, k = _maxdiff(f, ours_["fisher"][t])
        report.setdefault("fisher_F_max_abs", {})[t] = d
        report.setdefault("fisher_F_max_abs_over_max_F", {})[t] = d / max(
            float(v.abs().max()) for v in f.values()
        )
    merged = merging_with_fisher_weights(params, fishers, torch.ones(len(tasks)) / len(tasks), True, 1e-6)
    d, k = _maxdiff(merged, ours_["merged"]["fisher"])
    report["fisher_merged_max_abs"], report["fisher_merged_worst"] = d, k
    acc = FisherAccumulator(1e-6)  # our streamed merge on FusionBench's Fishers: the merge step alone
    for i, f in enumerate(fishers):
        acc.add({k: v[i] for k, v in params.items()}, f, 1.0 / (global_norm(f) + 1e-6))
    report["fisher_merge_step_alone_max_abs"] = _maxdiff(merged, acc.result(merged))[0]

    # ---- RegMean ----
    rm = RegMeanAlgorithmForCLIP(
        num_regmean_examples=256,
        exclude_param_names_regex=[],
        reduce_non_diagonal_ratio=0.95,
        weight_transpose=True,
        dataloader_kwargs=dl,
    )
    setup(rm)
    real_loader = clip_regmean.DataLoader
    clip_regmean.DataLoader = lambda ds, shuffle, **kw: real_loader(ds, shuffle=False, **kw)  # our order
    params, grams = {}, []
    try:
        for t in tasks:
            model = load(t)
            for k, v in model.state_dict().items():
                params.setdefault(k, []).append(v.detach().clone())
            linear = get_modules_to_merge(model, [torch.nn.Linear])
            g = rm.get_regmean_weights(t, model, dataset(ours_["batches"]["regmean"][t]), linear)
            grams.append(g)
            ours_g = {k[: -len(".weight")]: v for k, v in ours_["gram"][t].items()}
            assert set(ours_g) == set(g), sorted(set(ours_g) ^ set(g))
            report.setdefault("regmean_G_max_abs", {})[t] = _maxdiff(g, ours_g)[0]
    finally:
        clip_regmean.DataLoader = real_loader
    merged = merging_with_regmean_weights(params, grams, 0.95, True)
    d, k = _maxdiff(merged, ours_["merged"]["regmean"])
    report["regmean_merged_max_abs"], report["regmean_merged_worst"] = d, k
    acc = RegMeanAccumulator(0.95)  # our streamed merge on FusionBench's Grams: the merge step alone
    for i, g in enumerate(grams):
        acc.add({k: v[i] for k, v in params.items()}, {f"{m}.weight": v for m, v in g.items()})
    report["regmean_merge_step_alone_max_abs"] = _maxdiff(merged, acc.result(merged))[0]
    cond = {
        m: float(torch.linalg.cond(sum(reduce_non_diagonal(g[m], 0.95) for g in grams))) for m in grams[0]
    }
    report["regmean_max_condition_number"] = max(cond.values())
    print(json.dumps(report, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["ours", "reference"])
    p.add_argument("zoo", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    (ours if a.stage == "ours" else lambda z, o, s: reference(z, o))(a.zoo, a.out, a.seed)


if __name__ == "__main__":
    main()
