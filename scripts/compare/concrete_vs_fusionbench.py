"""Side by side: ``method=concrete`` against FusionBench 0.2.33's own Concrete subspace algorithms.

Two commands: the task data with this repo's venv (FusionBench's venv has no scikit-learn), then the
comparison with the FusionBench venv and this repo's ``src`` on the path, on an exported digits8 zoo
(``python -m otmf_exp.offline.zoo export ZOO``)::

    .venv/bin/python scripts/compare/concrete_vs_fusionbench.py ZOO --export-data DATA.pt
    PYTHONPATH=src /work/fbvenv/bin/python scripts/compare/concrete_vs_fusionbench.py ZOO \
        --data DATA.pt --merge task_arithmetic --steps 20

Both sides get the same models (FusionBench: ``CLIPVisionModel`` checkpoints of the zoo's towers in a
``CLIPVisionModelPool``), the same batches (FusionBench's ``get_shuffled_test_loader_iter`` returns
our seeded streams) and the same noise (FusionBench's global RNG seeded, right after its model setup,
with the seed our generator uses; both draw one uniform tensor per parameter in the same order).
FusionBench's zero-shot heads are our heads (logit scale folded in, so ``logit_scale_exp`` = 1) over
the pre-trained visual projection. FusionBench's ``run()`` is called unchanged (its YAML + the
overrides below); ours runs with ``fusionbench_stale_inner=true``. Prints max |Δ| of the mask logits,
the final (rescaled) mask, the learned coefficients and the merged weights, and ``COMPARE {json}``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

YAMLS = {
    ("task_arithmetic", "task"): ("clip_concrete_task_arithmetic", "ConcreteTaskArithmeticAlgorithmForCLIP"),
    ("adamerging", "task"): ("clip_concrete_task_wise_adamerging", "ConcreteTaskWiseAdaMergingForCLIP"),
    ("adamerging", "layer"): ("clip_concrete_layer_wise_adamerging", "ConcreteLayerWiseAdaMergingForCLIP"),
}


def ours(zoo: Path, tasks: list[str], args, module, datas, heads):
    from otmf_exp.merging.base import MethodContext, TaskInput
    from otmf_exp.merging.concrete.concrete import Concrete, ConcreteConfig
    from otmf_exp.models.clip_vision import ClipVisionBackbone

    class Tower(ClipVisionBackbone):  # the tiny backbone without its zoo: task weights come from ZOO
        def load_finetuned(self, task):
            raise NotImplementedError

    bb = Tower(module, "cpu")
    pre = {k: v.detach().clone() for k, v in module.named_parameters() if k in set(bb.mergeable_names())}
    cfg = ConcreteConfig(
        merge=args.merge,
        granularity=args.granularity,
        max_steps=args.steps,
        max_adamerging_steps=args.adamerging_steps,
        batch_size=args.batch_size,
        fusionbench_stale_inner=not args.ours_fresh_inner,
    )
    ctx = MethodContext(bb, torch.device("cpu"), torch.Generator(), progress=False, seed=args.seed)
    method = Concrete(cfg, ctx, protocol="joint")
    seen: dict = {}
    final_mask, adamerging = method._final_mask, method._adamerging

    def keep_mask(logits, gen):
        seen["logits"] = {k: v.detach().clone() for k, v in logits.items()}
        seen["mask"] = final_mask(logits, gen)
        return seen["mask"]

    def keep_coef(*a, **k):
        seen["coef"] = adamerging(*a, **k)
        return seen["coef"]

    method._final_mask, method._adamerging = keep_mask, keep_coef
    inputs = []
    for i, t in enumerate(tasks):
        sd = load_file(str(zoo / f"{t}.safetensors"))
        inputs.append(TaskInput(t, i, {k: sd[k] for k in pre}, heads[t], datas[t]))
    state = method.joint(pre, inputs)
    seen["weights"] = {k: pre[k] + state.merged[k] for k in pre}
    return seen, ctx


def fusionbench(zoo: Path, tasks: list[str], args, module, datas, heads, ctx):
    import importlib

    import lightning as L
    from fusion_bench.modelpool import CLIPVisionModelPool
    from transformers import CLIPVisionConfig, CLIPVisionModel

    yaml_name, cls_name = YAMLS[(args.merge, args.granularity)]
    cfg_dir = Path(importlib.import_module("fusion_bench_config").__path__[0])
    cfg = OmegaConf.load(cfg_dir / "method" / "concrete_subspace" / f"{yaml_name}.yaml")
    cfg.max_steps, cfg.batch_size, cfg.save_interval = args.steps, args.batch_size, 10**9
    if "max_adamerging_steps" in cfg:
        cfg.max_adamerging_steps = args.adamerging_steps
    mod = "clip_concrete_task_arithmetic" if args.merge == "task_arithmetic" else "clip_concrete_adamerging"
    cls = getattr(importlib.import_module(f"fusion_bench.method.concrete_subspace.{mod}"), cls_name)

    vcfg = CLIPVisionConfig(**{k: v for k, v in module.config.to_dict().items() if k != "projection_dim"})
    tmp = tempfile.TemporaryDirectory()
    paths = {}
    for name in ["_pretrained_", *tasks]:
        sd = load_file(str(zoo / f"{'pretrained' if name == '_pretrained_' else name}.safetensors"))
        m = CLIPVisionModel(vcfg)
        missing = m.load_state_dict(
            {k: v for k, v in sd.items() if k.startswith("vision_model.")}, strict=False
        )
        assert not missing.missing_keys, missing.missing_keys
        paths[name] = f"{tmp.name}/{name}"
        m.save_pretrained(paths[name])
    pool = CLIPVisionModelPool(
        models={
            k: {
                "_target_": "transformers.CLIPVisionModel.from_pretrained",
                "pretrained_model_name_or_path": v,
            }
            for k, v in paths.items()
        }
    )
    algo = cls(cfg)
    algo.fabric = L.Fabric(accelerator="cpu", devices=1)
    algo.log_hyperparams = lambda *a, **k: None
    streams = {
        t: (
            (b["inputs"], b["labels"])
            for b in datas[t].batches("test", args.batch_size, ctx.seed_for("concrete", "data", j))
        )
        for j, t in enumerate(tasks)
    }
    algo.get_shuffled_test_loader_iter = lambda task: streams[task]
    seen: dict = {}

    def heads_setup():
        algo.zeroshot_weights = dict(heads)
        algo.visual_projection = module.visual_projection
        algo.logit_scale_exp = torch.tensor(1.0)

    algo.setup_zero_shot_classification_head = heads_setup
    setup = algo.setup_models

    def seeded_setup():
        out = setup()
        seen["mask_model"] = out[1]
        sample = out[1].sample_mask

        def keep(*a, **k):
            seen["mask"] = sample(*a, **k)  # the dict run() rescales in place
            return seen["mask"]

        out[1].sample_mask = keep
        torch.manual_seed(ctx.seed_for("concrete", "mask"))
        seen["module"] = out[0]
        return out

    algo.setup_models = seeded_setup
    model = algo.run(pool)
    seen["weights"] = {
        f"vision_model.{k}" if not k.startswith("vision_model.") else k: v
        for k, v in model.state_dict().items()
    }
    seen["logits"] = {k: v.detach() for k, v in seen["mask_model"].named_parameters()}
    if args.merge == "adamerging":
        seen["coef"] = seen["module"].merge_weight.detach()
    tmp.cleanup()
    return seen


def max_abs(a: dict, b: dict) -> float:
    assert list(a) == list(b), "key order differs"
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("zoo", type=Path)
    p.add_argument("--tasks", default="rot90,flip,invert")
    p.add_argument("--merge", default="task_arithmetic", choices=["task_arithmetic", "adamerging"])
    p.add_argument("--granularity", default="task", choices=["task", "layer"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--adamerging-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--entropy",
        default="ours",
        choices=["ours", "fusionbench"],
        help="fusionbench: our side uses FusionBench's entropy_loss (−Σ p log(p + 1e-8)) instead of ours (log_softmax)",
    )
    p.add_argument(
        "--ours-fresh-inner", action="store_true", help="our side without the stale-coefficient quirk"
    )
    p.add_argument("--export-data", type=Path, help="write the tasks' splits to this file and stop")
    p.add_argument("--data", type=Path, help="the file --export-data wrote")
    args = p.parse_args()
    torch.set_num_threads(1)
    tasks = args.tasks.split(",")
    if args.export_data:
        from otmf_exp.data.digits import build_task

        torch.save({t: (build_task(t).splits, build_task(t).classnames) for t in tasks}, args.export_data)
        return

    from otmf_exp.data.base import TensorTaskData
    from otmf_exp.offline.tiny_clip import TinyRecipe, load_module

    meta = json.loads((args.zoo / "config.json").read_text())
    module = load_module(TinyRecipe(**meta["recipe"]), load_file(str(args.zoo / "pretrained.safetensors")))
    module.requires_grad_(False)
    heads_all = load_file(str(args.zoo / "heads.safetensors"))
    heads = {t: heads_all[t] for t in tasks}
    saved = torch.load(args.data)
    datas = {t: TensorTaskData(t, *saved[t]) for t in tasks}
    if args.entropy == "fusionbench":
        from fusion_bench.method.adamerging.entropy_loss import entropy_loss

        import otmf_exp.merging.concrete.concrete as concrete

        concrete.entropy = entropy_loss
    a, ctx = ours(args.zoo, tasks, args, module, datas, heads)
    b = fusionbench(args.zoo, tasks, args, module, datas, heads, ctx)
    b["weights"] = {k: b["weights"][k] for k in a["weights"]}
    mask_b = {k: b["mask"][k] for k in a["mask"]}
    out = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "max_abs_logits": max_abs(a["logits"], b["logits"]),
        "max_abs_final_mask": max_abs(a["mask"], mask_b),
        "max_abs_weights": max_abs(a["weights"], b["weights"]),
        "max_abs_weights_scale": max(float(v.abs().max()) for v in a["weights"].values()),
        "logit_change_max": max(float(v.abs().max()) for v in a["logits"].values()),
    }
    if "coef" in a:
        out["max_abs_coef"] = float((a["coef"] - b["coef"]).abs().max())
        out["coef_ours"] = a["coef"].flatten()[:8].tolist()
        out["coef_fusionbench"] = b["coef"].flatten()[:8].tolist()
    d = {k: (a["logits"][k] - b["logits"][k]).abs() for k in a["logits"]}
    n = sum(v.numel() for v in d.values())
    out["logits_frac_above_1e-6"] = sum(int((v > 1e-6).sum()) for v in d.values()) / n
    out["logits_worst_tensor"] = max(d, key=lambda k: float(d[k].max()))
    out["logits_max_abs_per_tensor_top5"] = sorted(((float(v.max()), k) for k, v in d.items()), reverse=True)[
        :5
    ]
    for k, v in out.items():
        print(f"{k}: {v}")
    print("COMPARE " + json.dumps(out))


if __name__ == "__main__":
    main()
