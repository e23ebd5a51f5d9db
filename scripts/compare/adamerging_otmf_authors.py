"""The OTMF authors' sequential AdaMerging scripts (GitHub 37ETs/OT_fusion
``scripts/clip_task_wise_adamerging_sequential.py``, ``scripts/clip_layer_wise_adamerging_sequential.py``)
run on the exported digits8 zoo with our side's batch plans; their own classes and loops
(``Program.task_wise_adamerging_sequential``, the layer-wise ``main``, ``TaskWiseMergedModel``, their
``AdaMerging``/``ModelWrapper``, ``ClassificationHead``); only data and checkpoint plumbing is replaced.

    PYTHONPATH=<OT_fusion>/scripts:<OT_fusion>:<dir with geomloss> .venv-parity/bin/python \\
        scripts/compare/adamerging_otmf_authors.py ZOO OURS_DIR OUT_DIR
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import types
from copy import deepcopy
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).parent))
sys.modules.setdefault(
    "timer", types.SimpleNamespace(timer=None)
)  # imported by their script, not in their repo

from _reference_zoo import Encoder, Zoo, accuracy, logged, tracing_adam  # noqa: E402

CPU = torch.device("cpu")


def setup(zoo: Zoo, case: dict):
    from src.modeling import ClassificationHead

    order = case["order"]
    pre = Encoder(zoo.tower(zoo.pretrained))
    sd = pre.state_dict()
    tvs = []
    for n in order:  # their TaskVector: θ_t − θ₀ over the float state-dict keys, state-dict order
        ft = {f"model.{k}": v for k, v in zoo.finetuned(n).items()}
        tvs.append(
            {k: ft.get(k, v) - v for k, v in sd.items() if v.is_floating_point()}
        )  # projection: θ₀ (frozen)
    heads = {n: ClassificationHead(normalize=True, weights=zoo.heads[n]).eval() for n in order}
    return order, pre, tvs, heads


def task_wise(zoo: Zoo, case: dict) -> dict:
    import clip_task_wise_adamerging_sequential as script
    from src.task_wise_fusion import TaskWiseMergedModel

    clamp = case["options"]["clamp"] != "none"

    class CopyingTaskWiseMergedModel(TaskWiseMergedModel):
        """Their class, θ₀ copied before the in-place merge: ``.to(device)`` copies on their GPU, is a
        no-op on CPU, where their ``+=`` would write into θ₀ (and fail at the second step)."""

        def __init__(self, *a, clamp_weights=True, **k):
            super().__init__(*a, clamp_weights=clamp, **k)  # none: their class with clamp_weights=False

        def merge_weights(self):
            keep = self.pretrained_state_dict
            self.pretrained_state_dict = {k: v.clone() for k, v in keep.items()}
            try:
                super().merge_weights()
            finally:
                self.pretrained_state_dict = keep

    order, pre, tvs, heads = setup(zoo, case)
    consumed: list = []
    prog = object.__new__(script.Program)
    prog.cfg = OmegaConf.create({"datasets": order})
    prog.device = CPU
    prog.pretrained_model, prog.task_vectors, prog.classification_heads = pre, tvs, heads
    plans = case["plans"]  # their load_datasets: iter(itertools.cycle(shuffled test loader)) per task
    prog.shuffled_test_loader_iters = {
        n: logged(n, itertools.cycle([(x, torch.zeros(len(x))) for x in plans[n]]), consumed) for n in order
    }
    tmp = Path(tempfile.mkdtemp())
    prog.ckpt_dir, prog.ckpt_path = tmp, tmp / "ckpt.pt"
    trace: list = []
    real_adam, real_cls, real_init = (
        torch.optim.Adam,
        script.TaskWiseMergedModel,
        script.get_task_wise_weights,
    )
    init, lr = constants(case, 0.2, 0.01)  # their hard-coded init_values=0.2, lr=0.01
    torch.optim.Adam, script.TaskWiseMergedModel = tracing_adam(trace, lr), CopyingTaskWiseMergedModel
    script.get_task_wise_weights = lambda n, init_values=None: real_init(n, init_values=init)
    try:
        prog.task_wise_adamerging_sequential()
    finally:
        torch.optim.Adam, script.TaskWiseMergedModel = real_adam, real_cls
        script.get_task_wise_weights = real_init
    merged = torch.load(prog.ckpt_path)["merged_state_dict"]
    per_step = [prog.task_vectors[i] for i in range(1, len(order))]
    return finish(
        pre, merged, per_step, trace, consumed, heads, case, lambda w: w.clamp(0, 1) if clamp else w
    )


def layer_wise(zoo: Zoo, case: dict) -> dict:
    import clip_layer_wise_adamerging_sequential as script
    import src.datasets.registry as registry

    order, pre, tvs, heads = setup(zoo, case)
    consumed, trace, captured, merged_in = [], [], {}, []
    plans, calls = case["plans"], [0]

    def get_dataset(name, preprocess, location=None, batch_size=None, num_workers=None):
        t = calls[0] // 2 + 2  # their step i builds [datasets[i], datasets[i+1]]: our step t = i + 2
        calls[0] += 1
        batches = [(x, torch.zeros(len(x))) for x in plans[(t, name)]]
        # their itertools.cycle reads one pass and replays it: that pass is logged as it is drawn
        shuffled = type("Logged", (), {"__iter__": lambda self: logged(name, iter(batches), consumed)})()
        return types.SimpleNamespace(test_loader_shuffle=shuffled)

    class TV:  # their TaskVector(pretrained_checkpoint, finetuned_checkpoint).vector
        def __init__(self, _pre, ft):
            self.vector = dict(tvs[order.index(ft)])

    init, lr = constants(case, 0.3, 1e-3)  # their hard-coded prior = 0.3, lr = 1e-3

    their_init, their_encoder = script.AdaMerging.__init__, script.AdaMerging.get_image_encoder

    def recording_init(self, paramslist, *a, **k):  # their class keeps its name (their super() call)
        merged_in.append(paramslist[1])  # step i >= 1: the merged vector of step i − 1
        their_init(self, paramslist, *a, **k)
        with torch.no_grad():
            self.lambdas_raw.fill_(init)

    def evaluate(image_encoder, head, name, cfg):
        captured["merged"] = {n: p.detach().clone() for n, p in zip(captured["names"], captured["params"]())}
        return {"top1": 0.0}

    real_load, real_adam = torch.load, torch.optim.Adam
    saved = {k: getattr(script, k) for k in ("device", "TaskVector", "RESULTS_DIR")}
    saved |= {
        k: getattr(script, k) for k in ("get_classification_head", "eval_single_dataset_preprocess_head")
    }
    saved |= {k: getattr(script, k) for k in ("pretrained_model_path", "finetuned_model_path")}
    real_get = registry.get_dataset
    script.device, script.TaskVector = CPU, TV
    script.RESULTS_DIR = Path(tempfile.mkdtemp())
    script.get_classification_head = lambda cfg, n: deepcopy(heads[n])
    script.eval_single_dataset_preprocess_head = evaluate
    script.pretrained_model_path, script.finetuned_model_path = (lambda m: "θ0"), (lambda m, n: n)
    registry.get_dataset = get_dataset
    torch.load = lambda p, *a, **k: deepcopy(pre) if p == "θ0" else real_load(p, *a, **k)
    torch.optim.Adam = tracing_adam(trace, lr)

    def get_image_encoder(self):  # record the names/params their eval sees (the final merged weights)
        alph = self.lambdas()
        captured["names"] = [n.replace("model.model.", "model.") for n in self.names]
        captured["params"] = lambda: tuple(
            sum(tuple(pi * li for pi, li in zip(p, alph[j].cpu())))
            for j, p in enumerate(zip(*self.paramslist))
        )
        return their_encoder(self)

    script.AdaMerging.__init__, script.AdaMerging.get_image_encoder = recording_init, get_image_encoder
    cfg = OmegaConf.create({"model": "tiny", "sam_retraining": False, "datasets": order, "num_workers": 0})
    try:
        script.main(cfg)
    finally:
        torch.load, torch.optim.Adam, registry.get_dataset = real_load, real_adam, real_get
        for k, v in saved.items():
            setattr(script, k, v)
        script.AdaMerging.__init__, script.AdaMerging.get_image_encoder = their_init, their_encoder
    sd = pre.state_dict()
    per_step = [dict(zip(sd, tv)) for tv in merged_in[1:]]  # their merged_vector = θ − θ₀
    merged = captured["merged"]
    per_step.append({k: merged[k] - sd[k] for k in sd})
    return finish(pre, merged, per_step, trace, consumed, heads, case, lambda w: w.clamp(0, 1), layer=True)


def constants(case: dict, init: float, lr: float) -> tuple[float, float | None]:
    """(init, lr) of a case: the script's own values unless the case (a clamp-binding one) sets others."""
    o = case["options"]
    return o.get("init", init), (o["lr"] if o.get("lr", lr) != lr else None)


def finish(pre, merged, per_step, trace, consumed, heads, case, eff, layer=False) -> dict:
    """Their numbers in our layout: coefficients as merged ([2] task-wise; [2, P] over our keys
    layer-wise), θ and τᵐ over our mergeable keys (``vision_model.*``), final accuracies."""
    ours = case["mergeable"]
    keys = [k for k in pre.state_dict()]
    rows = [keys.index(f"model.{k}") for k in ours]
    coef = [eff(w).T[:, rows] if layer else eff(w) for w in trace]
    strip = {k: f"model.{k}" for k in ours}
    model = deepcopy(pre)
    model.load_state_dict(merged)
    acc = {n: accuracy(model, heads[n], *case["test"][n]) for n in case["order"]}
    return {
        "trace": coef,
        "merged": {k: merged[strip[k]].detach() for k in ours},
        "per_step": [{k: tv[strip[k]] for k in ours} for tv in per_step],
        "acc": acc,
        "consumed": consumed,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("zoo", type=Path)
    ap.add_argument("ours", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--cases", default="task,task_binds,task_none_binds,task_project_binds,layer,layer_binds")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    zoo = Zoo(args.zoo)
    for name in args.cases.split(","):
        case = torch.load(args.ours / f"{name}.pt", weights_only=False)
        run = task_wise if case["reference"] == "otmf_task" else layer_wise
        torch.save(run(zoo, case), args.out / f"{name}.pt")
        print(name, "done")


if __name__ == "__main__":
    main()
