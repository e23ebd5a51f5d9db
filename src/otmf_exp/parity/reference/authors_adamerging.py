"""The reference side of the AdaMerging rows of ``make parity-authors``: the OTMF authors' sequential
scripts and MINGLE's C. AdaMerging, their own classes and loops, fed our recorded batches.

Each reference runs in a child process (``python -m otmf_exp.parity.reference.authors_adamerging NAME ZOO
WORK``) with the clone first on ``sys.path``: MINGLE's fork of ``fusion_bench`` must shadow the installed
one, and the OTMF scripts patch module globals. Replaced, as plumbing only: the data (loaders serving the
batch plans our side wrote to ``WORK/case.pt``), checkpoints (the zoo's towers), the classification
heads (the zoo's), evaluation (skipped: the merged weights are compared), and on CPU the authors'
in-place ``merge_weights`` gets a copy of θ₀ first (``.to(device)`` copies on their GPU, not on CPU,
where their ``+=`` would write into θ₀). Cases off a script's hard-coded init / lr patch those two.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile
import types
from copy import deepcopy
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from otmf_exp.parity.reference.zoo import Encoder, Zoo, logged, save, tracing_adam

CPU = torch.device("cpu")
REPOS = {"otmf_task": "OTMF_REPO", "otmf_layer": "OTMF_REPO", "c_adamerging": "MINGLE_REPO"}


def named(
    trace: list[Tensor],
    per_step: list[dict[str, Tensor]],
    first_step: int,
    merged: dict[str, Tensor],
    consumed: list[tuple[str, Tensor]],
    keys: list[str],
) -> dict[str, Tensor]:
    """The compared tensors, in one layout on both sides: ``coef/<adam step>`` (λ as merged, flattened;
    layer-wise [2, P] over ``keys`` without the ``k_proj.bias`` columns: their true gradient is 0, so
    Adam turns float noise into ±lr steps on both sides, and the merged output does not depend on
    them), ``tau/<step>/<key>`` (steps numbered from ``first_step``), ``weights/<key>``,
    ``batch/<task>/<j>`` (per task, in the order drawn: within a step the pools' order differs)."""
    keep = torch.tensor([not k.endswith("k_proj.bias") for k in keys])
    out = {}
    for i, c in enumerate(trace):
        c = c.detach()
        c = c.reshape(2, -1)[:, keep] if c.numel() == 2 * len(keys) else c
        out[f"coef/{i:04d}"] = c.reshape(-1).clone()
    for s, tv in enumerate(per_step, start=first_step):
        out.update({f"tau/{s}/{k}": v.detach().clone() for k, v in tv.items()})
    out.update({f"weights/{k}": v.detach().clone() for k, v in merged.items()})
    seen: dict[str, int] = {}
    for name, x in consumed:
        out[f"batch/{name}/{seen.setdefault(name, 0):04d}"] = x.clone()
        seen[name] += 1
    return out


def _child(
    name: str, zoo_dir: Path, work_dir: Path, module: str = __name__, repo: str | None = None
) -> dict[str, Tensor]:
    """Run ``name`` in a child process (``python -m module NAME ZOO WORK``) with its clone (``repo``,
    default ``REPOS[name]``) first on the path; its tensors."""
    repo = repo or REPOS[name]
    root = os.environ.get(repo)
    if not root or not Path(root).is_dir():
        raise RuntimeError(f"{repo} is not set (make parity-authors sets it from {repo}=DIR)")
    paths = [root] + ([str(Path(root) / "scripts")] if name.startswith("otmf") else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", module, name, str(zoo_dir), str(work_dir)]
    proc = subprocess.run(cmd, env=env, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise RuntimeError(f"{name} failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    return load_file(str(work_dir / "theirs.child.safetensors"))


def otmf_task(zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
    return _child("otmf_task", zoo_dir, work_dir)


def otmf_layer(zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
    return _child("otmf_layer", zoo_dir, work_dir)


def c_adamerging(zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
    return _child("c_adamerging", zoo_dir, work_dir)


class CopiesPretrainedOnMerge:
    """Mixin for the authors' merged-model classes: their in-place ``merge_weights`` works on a copy of
    θ₀ (on their GPU ``.to(device)`` copies; on CPU it would add into θ₀ itself, see the docstring)."""

    def merge_weights(self):
        keep = self.pretrained_state_dict
        self.pretrained_state_dict = {k: v.clone() for k, v in keep.items()}
        try:
            super().merge_weights()
        finally:
            self.pretrained_state_dict = keep


def _setup(zoo: Zoo, case: dict):
    from src.modeling import ClassificationHead

    order = case["order"]
    pre = Encoder(zoo.tower(zoo.pretrained, with_projection=True))
    sd = pre.state_dict()
    tvs = []
    for n in order:  # their TaskVector: θ_t − θ₀ over the float state-dict keys, state-dict order
        ft = {f"model.{k}": v for k, v in zoo.finetuned(n).items()}
        tvs.append({k: ft.get(k, v) - v for k, v in sd.items() if v.is_floating_point()})
    heads = {n: ClassificationHead(normalize=True, weights=zoo.heads[n]).eval() for n in order}
    return order, pre, tvs, heads


def _constants(case: dict, init: float, lr: float) -> tuple[float, float | None]:
    """(init, lr) of a case: the script's own values unless the case (a clamp-binding one) sets others."""
    o = case["options"]
    return o.get("init", init), (o["lr"] if o.get("lr", lr) != lr else None)


def _in_our_layout(pre, merged, per_step, trace, consumed, case, layer=False) -> dict[str, Tensor]:
    """Their numbers in our layout: λ as merged (clamped; layer-wise [2, P] over our keys), θ and τᵐ over
    our mergeable keys (``vision_model.*``; theirs are ``model.vision_model.*``)."""
    ours = case["mergeable"]
    keys = list(pre.state_dict())
    rows = [keys.index(f"model.{k}") for k in ours]
    eff = (lambda w: w.clamp(0, 1)) if case["options"]["clamp"] != "none" else (lambda w: w)
    coef = [eff(w).T[:, rows] if layer else eff(w) for w in trace]
    return named(
        coef,
        [{k: tv[f"model.{k}"] for k in ours} for tv in per_step],
        2,
        {k: merged[f"model.{k}"].detach() for k in ours},
        consumed,
        ours,
    )


def _otmf_task(zoo: Zoo, case: dict) -> dict[str, Tensor]:
    import clip_task_wise_adamerging_sequential as script
    from src.task_wise_fusion import TaskWiseMergedModel

    clamp = case["options"]["clamp"] != "none"

    class CopyingTaskWiseMergedModel(CopiesPretrainedOnMerge, TaskWiseMergedModel):
        """Their class, θ₀ copied before the in-place merge (see the module's docstring)."""

        def __init__(self, *a, clamp_weights=True, **k):
            super().__init__(*a, clamp_weights=clamp, **k)  # none: their class with clamp_weights=False

    order, pre, tvs, heads = _setup(zoo, case)
    consumed: list = []
    prog = object.__new__(script.Program)
    prog.cfg = types.SimpleNamespace(datasets=order)
    prog.device = CPU
    prog.pretrained_model, prog.task_vectors, prog.classification_heads = pre, tvs, heads
    plans = case["plans"]  # their load_datasets: iter(itertools.cycle(shuffled test loader)) per task
    prog.shuffled_test_loader_iters = {
        n: logged(n, itertools.cycle([(x, torch.zeros(len(x))) for x in plans[n]]), consumed) for n in order
    }
    tmp = Path(tempfile.mkdtemp())
    prog.ckpt_dir, prog.ckpt_path = tmp, tmp / "ckpt.pt"
    trace: list = []
    init, lr = _constants(case, 0.2, 0.01)  # their hard-coded init_values=0.2, lr=0.01
    real_init = script.get_task_wise_weights
    torch.optim.Adam, script.TaskWiseMergedModel = tracing_adam(trace, lr), CopyingTaskWiseMergedModel
    script.get_task_wise_weights = lambda n, init_values=None: real_init(n, init_values=init)
    prog.task_wise_adamerging_sequential()  # a child process: nothing to restore
    merged = torch.load(prog.ckpt_path)["merged_state_dict"]
    per_step = [prog.task_vectors[i] for i in range(1, len(order))]
    return _in_our_layout(pre, merged, per_step, trace, consumed, case)


def _otmf_layer(zoo: Zoo, case: dict) -> dict[str, Tensor]:
    import clip_layer_wise_adamerging_sequential as script
    import src.datasets.registry as registry

    order, pre, tvs, heads = _setup(zoo, case)
    consumed, trace, captured, merged_in = [], [], {}, []
    plans, calls = case["plans"], [0]

    def get_dataset(name, preprocess, location=None, batch_size=None, num_workers=None):
        t = calls[0] // 2 + 2  # their step i builds [datasets[i], datasets[i+1]]: our step t = i + 2
        calls[0] += 1
        batches = [(x, torch.zeros(len(x))) for x in plans[f"{t}/{name}"]]
        # their itertools.cycle reads one pass and replays it: that pass is logged as it is drawn
        shuffled = type("Logged", (), {"__iter__": lambda self: logged(name, iter(batches), consumed)})()
        return types.SimpleNamespace(test_loader_shuffle=shuffled)

    class TV:  # their TaskVector(pretrained_checkpoint, finetuned_checkpoint).vector
        def __init__(self, _pre, ft):
            self.vector = dict(tvs[order.index(ft)])

    init, lr = _constants(case, 0.3, 1e-3)  # their hard-coded prior = 0.3, lr = 1e-3
    their_init, their_encoder = script.AdaMerging.__init__, script.AdaMerging.get_image_encoder

    def recording_init(self, paramslist, *a, **k):  # their class keeps its name (their super() call)
        merged_in.append(paramslist[1])  # step i >= 1: the merged vector of step i − 1
        their_init(self, paramslist, *a, **k)
        with torch.no_grad():
            self.lambdas_raw.fill_(init)

    def evaluate(image_encoder, head, name, cfg):
        captured["merged"] = {n: p.detach().clone() for n, p in zip(captured["names"], captured["params"]())}
        return {"top1": 0.0}

    def get_image_encoder(self):  # record the names/params their eval sees (the final merged weights)
        alph = self.lambdas()
        captured["names"] = [n.replace("model.model.", "model.") for n in self.names]
        captured["params"] = lambda: tuple(
            sum(tuple(pi * li for pi, li in zip(p, alph[j].cpu())))
            for j, p in enumerate(zip(*self.paramslist))
        )
        return their_encoder(self)

    real_load = torch.load
    script.device, script.TaskVector = CPU, TV
    script.RESULTS_DIR = Path(tempfile.mkdtemp())
    script.get_classification_head = lambda cfg, n: deepcopy(heads[n])
    script.eval_single_dataset_preprocess_head = evaluate
    script.pretrained_model_path, script.finetuned_model_path = (lambda m: "θ0"), (lambda m, n: n)
    registry.get_dataset = get_dataset
    torch.load = lambda p, *a, **k: deepcopy(pre) if p == "θ0" else real_load(p, *a, **k)
    torch.optim.Adam = tracing_adam(trace, lr)
    script.AdaMerging.__init__, script.AdaMerging.get_image_encoder = recording_init, get_image_encoder
    from omegaconf import OmegaConf

    script.main(
        OmegaConf.create({"model": "tiny", "sam_retraining": False, "datasets": order, "num_workers": 0})
    )
    sd = pre.state_dict()
    per_step = [dict(zip(sd, tv)) for tv in merged_in[1:]]  # their merged_vector = θ − θ₀
    merged = captured["merged"]
    per_step.append({k: merged[k] - sd[k] for k in sd})
    return _in_our_layout(pre, merged, per_step, trace, consumed, case, layer=True)


class _Classifier:
    """Stands in for ``HFCLIPClassifier``: logits = normalize(projection(pooled)) @ headᵀ (the zoo's heads
    have the logit scale folded in)."""

    heads: dict = {}
    projection: Tensor | None = None

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


class _Epochs:
    """Stands in for ``DataLoader(seed subset, shuffle=True)``: the k-th ``iter()`` yields our k-th epoch."""

    def __init__(self, epochs, name, log):
        self.epochs, self.k, self.name, self.log = epochs, 0, name, log

    def __iter__(self):
        batches = [(x, torch.zeros(len(x))) for x in self.epochs[self.k]]
        self.k += 1
        return logged(self.name, iter(batches), self.log)


def _c_adamerging(zoo: Zoo, case: dict) -> dict[str, Tensor]:
    from fusion_bench.method.mingle import c_adamerging as ref

    if "mingle" not in (ref.__file__ or ""):
        raise RuntimeError(f"fusion_bench.method.mingle came from {ref.__file__}, not MINGLE_REPO")
    order, opts, plans = case["order"], case["options"], case["plans"]
    consumed, trace, saved, current = [], [], [], {}
    _Classifier.heads = {n: zoo.heads[n] for n in order}
    _Classifier.projection = zoo.pretrained["visual_projection.weight"]

    class Pool:  # the model pool: CLIPVisionModel θ₀ and θ_t
        model_names = list(order)

        def load_model(self, name):
            if name == "_pretrained_":
                return zoo.tower(zoo.pretrained)
            current["task"] = name
            return zoo.tower({**zoo.pretrained, **zoo.finetuned(name)})

    fabric = types.SimpleNamespace(device=CPU, to_device=lambda x: x, _loggers=[], is_global_zero=True)
    taskpool = types.SimpleNamespace(
        _test_datasets={n: n for n in order}, test_datasets={n: n for n in order}, setup=lambda: None,
        clip_model=types.SimpleNamespace(), processor=None, fabric=fabric, evaluate=lambda model: {},
    )  # fmt: skip

    class Plumbed(ref.ContinualLayerWiseAdaMerging):
        log_dir = tempfile.mkdtemp()

        def save_merged_model(self, merged, step):  # their per-step save: keep the state instead
            saved.append({k: v.detach().clone() for k, v in merged.state_dict().items()})

    algo = Plumbed(
        init_values=opts.get("init", 0.3), clamp_weights=opts["clamp"] != "none", lr=opts["lr"], batch_size=16,
        max_steps=case["steps"], shuffle_order=False, fast_dev_run=False, save_on_every_step=True,
        evaluate_on_every_step=False, seed_sample_number=opts["seed_samples"], seed=None,
    )  # fmt: skip
    algo._fabric_instance, algo._program = fabric, types.SimpleNamespace(taskpool=taskpool)
    ref.HFCLIPClassifier = _Classifier
    ref.get_classnames_and_templates = lambda name: ([], [])
    ref.select_seed_subset = lambda dataset, k: [(x, 0) for x in plans[current["task"]]["seeds"]]
    ref.DataLoader = lambda dataset, **kw: _Epochs(
        plans[current["task"]]["epochs"], current["task"], consumed
    )
    torch.optim.Adam = tracing_adam(trace)
    final = algo.run(Pool())
    pre, keys = zoo.pretrained, case["mergeable"]
    eff = (lambda w: w.clamp(0, 1)) if opts["clamp"] != "none" else (lambda w: w)
    return named(
        [eff(w) for w in trace],
        [{k: s[k] - pre[k] for k in keys} for s in saved],
        1,
        {k: final.state_dict()[k].detach() for k in keys},
        consumed,
        keys,
    )


def child_main(argv: list[str], runs: dict[str, tuple]) -> int:
    """A reference child process: ``NAME ZOO WORK`` → ``WORK/theirs.child.safetensors``, where
    ``runs[NAME] = (fn, dtype)`` and ``fn(Zoo(ZOO, dtype), case, dtype)`` gives the tensors."""
    name, zoo_dir, work_dir = argv[0], Path(argv[1]), Path(argv[2])
    torch.set_num_threads(1)
    sys.modules.setdefault("timer", types.SimpleNamespace(timer=None))  # the OTMF scripts import it
    case = torch.load(work_dir / "case.pt", weights_only=True)
    fn, dtype = runs[name]
    save(fn(Zoo(zoo_dir, dtype), case, dtype), work_dir / "theirs.child.safetensors")
    return 0


def main(argv: list[str]) -> int:
    f32 = torch.float32
    runs = {"otmf_task": _otmf_task, "otmf_layer": _otmf_layer, "c_adamerging": _c_adamerging}
    return child_main(argv, {n: (lambda zoo, case, dtype, _f=f: _f(zoo, case), f32) for n, f in runs.items()})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
