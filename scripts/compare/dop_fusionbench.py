"""DOP side by side with FusionBench 0.2.33's own ``ContinualDOPForCLIP`` on the exported digits8 zoo.

Run with a Python that has ``fusion-bench==0.2.33`` installed (FB_PY) and this repo's ``src`` on the path:

    .venv/bin/python -m otmf_exp.offline.zoo export /tmp/zoo
    PYTHONPATH=src OMP_NUM_THREADS=1 FB_PY scripts/compare/dop_fusionbench.py /tmp/zoo \
        --tasks rot90,flip,invert [--steps 200] [--json out.json]

Data plumbing only: the zoo's state dicts become ``CLIPVisionModel`` checkpoints (``save_pretrained``)
in a ``CLIPVisionModelPool``, and FusionBench's algorithm runs unchanged (``shuffle_order=false``, the
``dop.yaml`` defaults, ``num_steps`` from ``--steps``); its merged model after every step is captured
through ``save_on_every_step``. Our ``DOP`` runs on the same tensors through the real backbone class
(``ClipVisionBackbone``), once in FusionBench mode (``fusionbench_compat=true svd_rank=below``) and once
with our defaults. Prints max |Δw| over all vision-tower parameters after every step (and the
worst key), and ``DOP_COMPARE {json}``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

MARK = "DOP_COMPARE "


def _vision_config(zoo: Path):
    from transformers import CLIPVisionConfig

    cfg = json.loads((zoo / "config.json").read_text())["module_config"]
    keep = set(CLIPVisionConfig().to_dict()) - {"transformers_version", "architectures", "dtype"}
    return CLIPVisionConfig(**{k: v for k, v in cfg.items() if k in keep})


def _tower(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if k.startswith("vision_model.")}


def fusionbench_steps(zoo: Path, tasks: list[str], steps: int, **options) -> list[dict[str, torch.Tensor]]:
    """FusionBench's merged vision tower after each continual step (its own ``run`` loop)."""
    from fusion_bench.method.dop.dop import ContinualDOPForCLIP
    from fusion_bench.modelpool import CLIPVisionModelPool
    from omegaconf import OmegaConf
    from transformers import CLIPVisionModel

    cfg = _vision_config(zoo)
    yaml = OmegaConf.load(Path(__import__("fusion_bench_config").__path__[0]) / "method" / "dop" / "dop.yaml")
    kwargs = {k: v for k, v in OmegaConf.to_container(yaml).items() if k != "_target_"}
    kwargs |= {"seed": 0, "shuffle_order": False, "evaluate_on_every_step": False, "num_steps": steps}
    kwargs |= {"save_on_every_step": True, **options}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, file in [("_pretrained_", "pretrained"), *[(t, t) for t in tasks]]:
            model = CLIPVisionModel(cfg)
            model.load_state_dict(_tower(load_file(str(zoo / f"{file}.safetensors"))), strict=True)
            paths[name] = str(Path(tmp) / name)
            model.save_pretrained(paths[name])
        pool = CLIPVisionModelPool(
            models={
                k: {
                    "_target_": "transformers.CLIPVisionModel.from_pretrained",
                    "pretrained_model_name_or_path": v,
                }
                for k, v in paths.items()
            }
        )
        algo = ContinualDOPForCLIP(**kwargs)
        captured: list[dict[str, torch.Tensor]] = []
        algo.save_merged_model = lambda model, step: captured.append(
            {k: v.detach().clone() for k, v in model.state_dict().items()}
        )
        t0 = time.perf_counter()
        algo.run(pool)
        print(f"FusionBench: {len(tasks)} steps in {time.perf_counter() - t0:.1f} s", flush=True)
    return captured


def ours_steps(zoo: Path, tasks: list[str], steps: int, **options) -> tuple[list[dict], set[str]]:
    """θ₀ + τᵐ of our ``DOP`` after each step, on the same zoo tensors, and the Linear weights' names."""
    from transformers import CLIPVisionModelWithProjection

    from otmf_exp.merging import METHODS, MethodContext, TaskInput
    from otmf_exp.models.clip_vision import ClipVisionBackbone

    module = CLIPVisionModelWithProjection(_vision_config(zoo))
    module.load_state_dict(load_file(str(zoo / "pretrained.safetensors")), strict=False)

    class ZooBackbone(ClipVisionBackbone):  # the tasks' tensors are passed to ``step`` directly
        def load_finetuned(self, task: str):
            raise NotImplementedError

    bb = ZooBackbone(module, "cpu")
    cls = METHODS["dop"]
    cfg = SimpleNamespace(**{**cls.Config().__dict__, "steps": steps, **options})
    cls.validate(cfg)
    method = cls(cfg, MethodContext(bb, torch.device("cpu"), torch.Generator(), progress=False))
    pre = bb.pretrained_state()
    state = method.init(pre)
    out = []
    for i, t in enumerate(tasks):
        weights = {k: v for k, v in load_file(str(zoo / f"{t}.safetensors")).items() if k in pre}
        state = method.step(state, TaskInput(t, i, weights, None, None, owned=True), pre)
        out.append(method.merged(state, pre))
    return out, bb.linear_weight_names()


def compare(ref: list[dict], ours: list[dict], linear: set[str]) -> list[dict]:
    """Per step: max |Δw| over every parameter, over the Linear weights and over the others."""
    rows = []
    for step, (a, b) in enumerate(zip(ref, ours), start=1):
        diffs = {k: float((a[k] - b[k]).abs().max()) for k in b}
        worst = max(diffs, key=diffs.get)
        row = {"step": step, "max_abs_dw": diffs[worst], "worst_key": worst}
        row["linear"] = max(v for k, v in diffs.items() if k in linear)
        row["other"] = max(v for k, v in diffs.items() if k not in linear)
        rows.append(row)
    return rows


def yaml_value(text: str):
    """``true`` / ``0.5`` / ``1e-3`` / ``u`` as values (YAML scalars; ``1e-3`` as a float)."""
    import yaml

    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("zoo", type=Path)
    p.add_argument("--tasks", default="rot90,flip,invert")
    p.add_argument("--steps", type=int, default=200, help="Adam steps per Linear (dop.yaml: 200)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a dop.yaml field shared by both sides (lr, mgda, alpha, ema, ema_beta, svd_epsilon, "
        "svd_proj_space), e.g. --set mgda=false; then only the FusionBench mode is compared",
    )
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    torch.set_num_threads(1)
    tasks = [t for t in a.tasks.split(",") if t]
    shared = {k: yaml_value(v) for k, v in (kv.split("=", 1) for kv in a.set)}
    ref = fusionbench_steps(a.zoo, tasks, a.steps, **shared)
    result = {"tasks": tasks, "steps": a.steps, "set": shared}
    modes = {"fusionbench_mode": {"fusionbench_compat": True, "svd_rank": "below"}}
    if not shared:
        modes["defaults"] = {}
    for mode, options in modes.items():
        t0 = time.perf_counter()
        rows = compare(ref, *ours_steps(a.zoo, tasks, a.steps, **shared, **options))
        print(f"ours ({mode}): {time.perf_counter() - t0:.1f} s", flush=True)
        for r in rows:
            print(
                f"{mode:>16}  step {r['step']}: max |dw| = {r['max_abs_dw']:.3e} ({r['worst_key']}); "
                f"Linear weights {r['linear']:.3e}, other {r['other']:.3e}"
            )
        result[mode] = rows
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    print(MARK + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
