"""``method=continual_finetune`` against FusionBench 0.2.33's own ``ContinualImageClassificationFineTuningForCLIP``.

Both sides get the exported digits8 zoo's θ₀ and zero-shot heads and the same pinned batch plans (the
index batches of our method's seeded streams), train ``--steps`` steps per task over ``--tasks`` tasks,
and the script reports the max relative difference of the loss curves, the max |Δ| of the weights
after every task (the attention key biases apart: their true gradient is 0, so Adam moves them by
each side's float noise), and both sides' accuracies on every task's test split (our evaluator).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/compare/continual_finetune_fusionbench.py [--lora]

The reference runs in FusionBench's venv (``--fb-python``, default /work/fbvenv/bin/python): its class's
``run()`` is called unchanged; only data plumbing is replaced: a ``CLIPVisionModelPool`` subclass
serving a ``CLIPModel`` whose vision tower and projection are the zoo's θ₀ (logit scale 0, so the zoo's
heads, logit scale folded in, are its ``zeroshot_weights`` as they are), the task's train split as
``(image tensor, label)`` items with an identity processor, the module's ``DataLoader`` swapped for
one with the pinned ``batch_sampler``, the zero-shot-head setup replaced by those heads, a CSV logger.
With ``--lora`` both sides start from the same adapters (ours, copied into FusionBench's peft model)
and use lora_dropout 0 (dropout masks come from each side's own RNG stream).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve()
#: the attention key bias adds q·b to every score of a query: softmax is invariant to it, so its true
#: gradient is 0 and each side's Adam turns its own float noise into ±lr steps (reported apart)
ZERO_GRAD = ".k_proj.bias"


# ---- the reference side (FusionBench's venv; imports nothing from otmf_exp) ----------------------------
def reference(work: Path) -> None:
    import itertools

    import fusion_bench.method.classification.continual_clip_finetune as fb
    import lightning as L
    import torch
    from fusion_bench.modelpool import CLIPVisionModelPool
    from lightning.fabric.loggers import CSVLogger
    from omegaconf import DictConfig
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file, save_file
    from transformers import CLIPConfig, CLIPModel

    torch.set_num_threads(1)
    spec = json.loads((work / "spec.json").read_text())
    zoo = Path(spec["zoo"])
    vision_cfg = json.loads((zoo / "config.json").read_text())["module_config"]
    text_cfg = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config=text_cfg, vision_config=vision_cfg, projection_dim=vision_cfg["projection_dim"]
    )
    pre = load_file(str(zoo / "pretrained.safetensors"))
    heads = load_file(str(zoo / "heads.safetensors"))
    tasks = spec["tasks"]
    data = load_file(str(work / "data.safetensors"))
    plans = [spec["plans"][t] for t in tasks]

    def clip_model() -> CLIPModel:
        model = CLIPModel(config)
        res = model.load_state_dict(pre, strict=False)
        assert not res.unexpected_keys, res.unexpected_keys
        assert not [k for k in res.missing_keys if k.startswith(("vision_model", "visual_projection"))]
        model.logit_scale.data.fill_(0.0)  # exp = 1: the zoo's heads carry the logit scale
        return model.eval()

    class Pool(CLIPVisionModelPool):
        def __init__(self) -> None:  # data plumbing only: no hub, no config
            pass

        train_dataset_names = property(lambda self: list(tasks))

        def load_clip_model(self, name: str, *a, **k) -> CLIPModel:
            return clip_model()

        def load_processor(self, *a, **k):
            return lambda image: image  # items are already the model's input tensors

        def load_train_dataset(self, name: str, *a, **k):
            x, y = data[f"{name}/x"], data[f"{name}/y"]
            return [(x[i], int(y[i])) for i in range(len(y))]

    order = itertools.count()

    def pinned_loader(dataset, shuffle, batch_size, num_workers):
        return torch.utils.data.DataLoader(dataset, batch_sampler=plans[next(order)], num_workers=0)

    fb.DataLoader = pinned_loader
    lora_cfg = DictConfig(
        {
            "r": 16,
            "lora_alpha": 32,
            "target_modules": ["q_proj", "v_proj"],
            "lora_dropout": 0.0,
            "bias": "none",
        }
    )
    algo = fb.ContinualImageClassificationFineTuningForCLIP(
        seed=42,
        shuffle_order=False,
        learning_rate=spec["lr"],
        weight_decay=0,
        num_steps=spec["steps"],
        batch_size=spec["batch_size"],
        num_workers=0,
        save_interval=10**9,
        use_lora=spec["lora"],
        lora_config=lora_cfg,
    )

    class Logger(CSVLogger):  # FusionBench logs its hyperparameters; CSVLogger cannot
        def log_hyperparams(self, params, *a, **k) -> None:
            pass

    fabric = L.Fabric(accelerator="cpu", devices=1, loggers=[Logger(str(work / "fb_logs"))])
    fabric.launch()
    algo.fabric = fabric
    algo._program = SimpleNamespace(taskpool=None)
    algo.setup_zero_shot_classification_head = lambda **kw: setattr(
        algo, "zeroshot_weights", {t: heads[t] for t in tasks}
    )
    losses: list[float] = []
    log_dict = fabric.log_dict
    fabric.log_dict = lambda metrics, step=None: (
        losses.append(float(metrics["train/loss"])),
        log_dict(metrics, step),
    )
    snapshots: list[dict] = []

    def vision_weights(vm) -> dict:
        """The vision tower's weights under our names (LoRA deltas merged in, the model untouched)."""
        named = dict(vm.named_parameters())
        out = {}
        for name, p in named.items():
            if "lora_" in name:
                continue
            key = "vision_model." + name.replace("base_model.model.", "").replace(".base_layer", "")
            out[key] = p.detach().clone()
        for name, mod in vm.named_modules():
            if isinstance(mod, LoraLayer):
                key = "vision_model." + name.replace("base_model.model.", "") + ".weight"
                out[key] = out[key] + mod.get_delta_weight("default")
        return out

    setup_model = algo.setup_model

    def setup_model_with_our_adapters():
        processor, classifier, optimizer, sched = setup_model()
        vm = classifier.clip_model.vision_model
        if spec["lora"]:
            init = load_file(str(work / "lora_init.safetensors"))
            with torch.no_grad():
                for name, p in vm.named_parameters():
                    if "lora_" in name:
                        p.copy_(init["lora/vision_model." + name.replace("base_model.model.", "")])
        reset = optimizer.load_state_dict

        def snapshot_then_reset(sd):  # called once before each task: the weights after the previous
            snapshots.append(vision_weights(vm))
            return reset(sd)

        optimizer.load_state_dict = snapshot_then_reset
        return processor, classifier, optimizer, sched

    algo.setup_model = setup_model_with_our_adapters
    final = algo.run(Pool())
    snapshots.append(vision_weights(final))
    out = {f"task{i}/{k}": v for i, s in enumerate(snapshots[1:]) for k, v in s.items()}
    save_file(out, str(work / "fb_weights.safetensors"))
    (work / "fb_losses.json").write_text(json.dumps(losses))


# ---- our side -------------------------------------------------------------------------------------------
class PinnedData:
    """A task's data whose ``batches`` records the index plan of the stream it serves (ours, unchanged)."""

    def __init__(self, data, steps: int) -> None:
        self.data, self.steps, self.name, self.plan = data, steps, data.name, []

    def batches(self, split: str, batch_size: int, seed: int):
        from otmf_exp.data.base import index_plan

        x, y = self.data.splits[split]
        epoch = 0
        while True:
            for idx in index_plan(len(y), batch_size, shuffle=True, seed=seed + epoch, fraction=1.0):
                self.plan.append(idx)
                yield {"inputs": x[idx], "labels": y[idx]}
            epoch += 1


def ours(args: argparse.Namespace, work: Path) -> dict:
    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import load_file, save_file

    from otmf_exp.data.digits import build_task
    from otmf_exp.merging.base import MethodContext, TaskInput
    from otmf_exp.merging.finetune.continual_finetune import ContinualFinetune, ContinualFinetuneConfig
    from otmf_exp.models.tiny import TinyBackbone
    from otmf_exp.offline.zoo import DigitsZoo, suite_tasks

    torch.set_num_threads(1)
    tasks = suite_tasks()[: args.tasks]
    zoo_dir = work / "zoo"
    subprocess.run(
        [sys.executable, "-m", "otmf_exp.offline.zoo", "export", str(zoo_dir), "--tasks", ",".join(tasks)],
        check=True,
    )
    bb = TinyBackbone(DigitsZoo(progress=False), "cpu")
    pre = bb.pretrained_state()
    exported = load_file(str(zoo_dir / "pretrained.safetensors"))
    assert all(torch.equal(exported[k], v) for k, v in pre.items()), "zoo export differs from our θ₀"
    heads = load_file(str(zoo_dir / "heads.safetensors"))
    cfg = OmegaConf.structured(ContinualFinetuneConfig(steps=args.steps, batch_size=args.batch_size))
    cfg.lora.enabled, cfg.lora.dropout = args.lora, 0.0
    curves: list[float] = []
    ctx = MethodContext(
        bb, torch.device("cpu"), torch.Generator(), progress=False, seed=args.seed,
        record=lambda k, v: curves.extend(v) if k == "loss_curve" else None,
    )  # fmt: skip
    method = ContinualFinetune(cfg, ctx)
    if args.lora:  # the adapters our step 1 starts from (same seed, same first draw)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed_for("continual_finetune", 1, "rng"))
            with method._adapters({}) as adapters:
                save_file({f"lora/{n}": p.detach().clone() for n, p in adapters.items()}, str(work / "lora_init.safetensors"))  # fmt: skip
    datas = {t: build_task(t) for t in tasks}
    state, weights, plans = method.init(pre), [], {}
    for i, t in enumerate(tasks):
        pinned = PinnedData(datas[t], args.steps)
        state = method.step(state, TaskInput(t, i, None, heads[t], pinned), pre)
        plans[t] = pinned.plan[: args.steps]
        weights.append(method.merged(state, pre))
    data = {f"{t}/{s}": v.contiguous() for t in tasks for s, v in zip("xy", datas[t].splits["train"])}
    save_file(data, str(work / "data.safetensors"))
    spec = {"zoo": str(zoo_dir), "tasks": tasks, "plans": plans, "lr": cfg.lr, "steps": args.steps,
            "batch_size": args.batch_size, "lora": args.lora}  # fmt: skip
    (work / "spec.json").write_text(json.dumps(spec))
    return {
        "pre": pre,
        "bb": bb,
        "tasks": tasks,
        "datas": datas,
        "heads": heads,
        "weights": weights,
        "curve": curves,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="optimiser steps per task")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora", action="store_true", help="LoRA r 16 on q/v (dropout 0 on both sides)")
    p.add_argument("--fb-python", default="/work/fbvenv/bin/python")
    p.add_argument("--reference", type=Path, help=argparse.SUPPRESS)  # internal: the FusionBench side
    args = p.parse_args()
    if args.reference is not None:
        reference(args.reference)
        return 0
    import torch
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="cft_compare_") as tmp:
        work = Path(tmp)
        o = ours(args, work)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
        subprocess.run([args.fb_python, str(HERE), "--reference", str(work)], check=True, env=env)
        fb_curve = json.loads((work / "fb_losses.json").read_text())
        fb_w = load_file(str(work / "fb_weights.safetensors"))
    a, b = torch.tensor(o["curve"], dtype=torch.float64), torch.tensor(fb_curve, dtype=torch.float64)
    assert len(a) == len(b) == args.tasks * args.steps, (len(a), len(b))
    rel = float(((a - b).abs() / b.abs().clamp_min(1e-12)).max())
    bb, rows = o["bb"], []
    worst_w = worst_k = 0.0
    for i, (t, w) in enumerate(zip(o["tasks"], o["weights"])):
        theirs = {k: fb_w[f"task{i}/{k}"] for k in w}
        diff = {k: float((w[k] - theirs[k]).abs().max()) for k in w}
        dw = max(v for k, v in diff.items() if not k.endswith(ZERO_GRAD))
        dk = max(v for k, v in diff.items() if k.endswith(ZERO_GRAD))
        moved_k = max(float((w[k] - o["pre"][k]).abs().max()) for k in w if k.endswith(ZERO_GRAD))
        worst_k = max(worst_k, dk)
        worst_w = max(worst_w, dw)
        seen = o["tasks"][: i + 1]
        acc = [bb.evaluate(w, o["heads"][s], o["datas"][s], "test", 256) for s in seen]
        acc_fb = [bb.evaluate(theirs, o["heads"][s], o["datas"][s], "test", 256) for s in seen]
        rows.append(
            {
                "after": t,
                "weights_max_abs_diff": dw,
                "k_proj_bias_max_abs_diff": dk,
                "k_proj_bias_max_moved": moved_k,
                "acc_ours": acc,
                "acc_fusionbench": acc_fb,
            }
        )
    report = {
        "lora": args.lora, "tasks": o["tasks"], "steps_per_task": args.steps, "batch_size": args.batch_size,
        "loss_max_rel_diff": rel, "weights_max_abs_diff": worst_w, "k_proj_bias_max_abs_diff": worst_k,
        "loss_first_last_ours": [o["curve"][0], o["curve"][-1]], "per_task": rows,
    }  # fmt: skip
    print(json.dumps(report, indent=1))
    ok = rel <= 1e-5 and worst_w <= 1e-5 and all(r["acc_ours"] == r["acc_fusionbench"] for r in rows)
    print("MATCH" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
