"""MINGLE's C. AdaMerging (GitHub zihuanqiu/MINGLE ``fusion_bench/method/mingle/c_adamerging.py``:
``ContinualLayerWiseAdaMerging.run`` with its ``test_time_adaptation``, FusionBench's
``LayerWiseMergedModel`` and ``InfiniteDataLoader`` of that fork) on the exported digits8 zoo with our
side's seed samples and batch plans. Replaced, as plumbing only: the model pool, the task pool, the
CLIP classifier (a stand-in computing the same logits from the zoo's zero-shot heads, which have the
logit scale folded in), the seed-subset choice and the DataLoader (our batches), the fabric.

    PYTHONPATH=<MINGLE checkout> .venv-parity/bin/python scripts/compare/adamerging_mingle.py ZOO OURS_DIR OUT_DIR
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _reference_zoo import Zoo, logged, tracing_adam  # noqa: E402

CPU = torch.device("cpu")


class Classifier:
    """Stands in for ``HFCLIPClassifier``: logits = normalize(projection(pooled)) @ headᵀ."""

    heads: dict = {}
    projection: torch.Tensor = None

    def __init__(self, clip_model, processor=None):
        self.clip_model = clip_model

    def set_classification_task(self, classnames, templates):
        pass

    def train(self):
        return self

    def to(self, device):
        return self

    def __call__(self, images, return_image_embeds=False, return_dict=True, task_name=None):
        pooled = self.clip_model.vision_model(pixel_values=images)[1]
        emb = pooled @ self.projection.T
        emb = emb / emb.norm(p=2, dim=-1, keepdim=True)
        return {"logits": emb @ self.heads[task_name].T}


class Epochs:
    """Stands in for ``DataLoader(seed subset, shuffle=True)``: the k-th ``iter()`` yields our k-th epoch."""

    def __init__(self, epochs, name, log):
        self.epochs, self.k, self.name, self.log = epochs, 0, name, log

    def __iter__(self):
        batches = [(x, torch.zeros(len(x))) for x in self.epochs[self.k]]
        self.k += 1
        return logged(self.name, iter(batches), self.log)


def run(zoo: Zoo, case: dict) -> dict:
    from fusion_bench.method.mingle import c_adamerging as ref

    order, opts, plans = case["order"], case["options"], case["plans"]
    consumed, trace, saved = [], [], []
    Classifier.heads = {n: zoo.heads[n] for n in order}
    Classifier.projection = zoo.pretrained["visual_projection.weight"]
    current = {}

    class Pool:  # the model pool: CLIPVisionModel θ₀ and θ_t
        model_names = list(order)

        def load_model(self, name):
            if name == "_pretrained_":
                return zoo.tower(zoo.pretrained, with_projection=False)
            current["task"] = name
            return zoo.tower({**zoo.pretrained, **zoo.finetuned(name)}, with_projection=False)

    fabric = types.SimpleNamespace(device=CPU, to_device=lambda x: x, _loggers=[], is_global_zero=True)
    taskpool = types.SimpleNamespace(
        _test_datasets={n: n for n in order},
        test_datasets={n: n for n in order},
        setup=lambda: None,
        clip_model=types.SimpleNamespace(),
        processor=None,
        fabric=fabric,
        evaluate=lambda model: {},
    )

    class Plumbed(ref.ContinualLayerWiseAdaMerging):
        log_dir = tempfile.mkdtemp()

        def save_merged_model(self, merged, step):  # their per-step save: keep the state instead
            saved.append({k: v.detach().clone() for k, v in merged.state_dict().items()})

    algo = Plumbed(
        init_values=opts.get("init", 0.3),
        clamp_weights=opts["clamp"] != "none",
        lr=opts["lr"],
        batch_size=16,
        max_steps=case["steps"],
        shuffle_order=False,
        fast_dev_run=False,
        save_on_every_step=True,
        evaluate_on_every_step=False,
        seed_sample_number=opts["seed_samples"],
        seed=None,
    )
    algo._fabric_instance, algo._program = fabric, types.SimpleNamespace(taskpool=taskpool)
    patches = {
        "HFCLIPClassifier": Classifier,
        "get_classnames_and_templates": lambda name: ([], []),
        "select_seed_subset": lambda dataset, k: [(x, 0) for x in plans[current["task"]]["seeds"]],
        "DataLoader": lambda dataset, **kw: Epochs(
            plans[current["task"]]["epochs"], current["task"], consumed
        ),
    }
    real = {k: getattr(ref, k) for k in patches}
    real_adam = torch.optim.Adam
    for k, v in patches.items():
        setattr(ref, k, v)
    torch.optim.Adam = tracing_adam(trace)
    try:
        final = algo.run(Pool())
    finally:
        torch.optim.Adam = real_adam
        for k, v in real.items():
            setattr(ref, k, v)
    pre = zoo.pretrained
    keys = case["mergeable"]
    eff = (lambda w: w.clamp(0, 1)) if opts["clamp"] != "none" else (lambda w: w)
    acc = {}
    with torch.no_grad():
        for n in order:
            x, y = case["test"][n]
            Classifier.heads = {n: zoo.heads[n]}
            logits = Classifier(types.SimpleNamespace(vision_model=final))(x, task_name=n)["logits"]
            acc[n] = 100.0 * float((logits.argmax(-1) == y).float().mean())
    return {
        "trace": [eff(w) for w in trace],
        "merged": {k: final.state_dict()[k].detach() for k in keys},
        "per_step": [{k: s[k] - pre[k] for k in keys} for s in saved],
        "acc": acc,
        "consumed": consumed,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("zoo", type=Path)
    ap.add_argument("ours", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--cases", default="c_adamerging,c_adamerging_binds")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    zoo = Zoo(args.zoo)
    for name in args.cases.split(","):
        case = torch.load(args.ours / f"{name}.pt", weights_only=False)
        torch.save(run(zoo, case), args.out / f"{name}.pt")
        print(name, "done")


if __name__ == "__main__":
    main()
