"""Side-by-side: our ``method=wemoe`` against the references' own modules on the exported digits8 zoo.

    .venv/bin/python -m otmf_exp.offline.zoo export ZOO
    .venv-parity/bin/python scripts/compare/wemoe_fusionbench.py ZOO MINGLE_GIT_DIR

Half one (this interpreter, FusionBench 0.2.33) builds the references' merged towers from the zoo:
  * joint: θ₀ + 0.3·Σ τ_i (FusionBench's ``task_arithmetic_merge``, whose strict key/type check refuses
    these models in 0.2.33) + one ``WeightEnsemblingMoE`` per encoder
    MLP over the 8 task models (as ``CLIPWeightEnsemblingMoEAlgorithm.construct_moe_model`` does), for
    router depths 0/1/2 and ``batch_reduce`` true/false;
  * continual: the MINGLE authors' ``c_wemoe.py`` (read from their repository at run time):
    ``task_arithmetic_merge_attn``, ``LoRAMLP`` (rank 64 first, 16 after), ``SkipTVWEMoE`` and
    ``append_expert_and_rebuild_gate`` over 3 tasks, depth-1 routers, batch routing;
with every router's parameters redrawn (weights N(0, 1/fan_in), biases N(0, 0.5²): routing weights of
order 1 that differ across experts and samples), and
runs them on 16 random 8×8 images. Half two (``.venv/bin/python``, our package) builds the same merge
with ``method=wemoe`` (``max_steps=0``), loads the same router parameters into its state and runs the
same images through the one pre-trained tower under ``forward_context``. Prints max |Δ| per case.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TASKS3 = ["rot90", "flip", "invert"]
ROUTER_MAP = {
    "fc1.weight": "w1",
    "fc1.bias": "b1",
    "fc2.weight": "w",
    "fc2.bias": "b",
    "fc.weight": "w",
    "fc.bias": "b",
    "weight": "w",
}


def _models(zoo: Path, dtype: str = "float32"):
    import torch
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    mc = json.loads((zoo / "config.json").read_text())["module_config"]
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
            "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout")  # fmt: skip
    cfg = CLIPVisionConfig(**{k: mc[k] for k in keys})

    class Tower(torch.nn.Module):  # keys vision_model.* under transformers 4 and 5 alike
        def __init__(self) -> None:
            super().__init__()
            m = CLIPVisionModel(cfg)  # transformers 4: .vision_model; 5: the model itself
            self.vision_model = getattr(m, "vision_model", m)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.vision_model(pixel_values=x).last_hidden_state

    def load(name: str) -> torch.nn.Module:
        m = Tower()
        sd = {
            k: v for k, v in load_file(zoo / f"{name}.safetensors").items() if k.startswith("vision_model.")
        }
        m.load_state_dict(sd, strict=True)
        return m.eval().to(getattr(torch, dtype))

    return cfg, load


def _routers(moe_model, gen) -> dict:
    """Redraw every router parameter (weights N(0, 1/fan_in), biases N(0, 0.5²)); return them as ``<block>/router.<key>`` tensors."""
    import torch

    out = {}
    for i, layer in enumerate(moe_model.vision_model.encoder.layers):
        for k, p in layer.mlp.gate.named_parameters():
            std = 1.0 / p.shape[1] ** 0.5 if p.dim() == 2 else 0.5  # routing weights of order 1
            p.data = std * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            out[f"vision_model.encoder.layers.{i}.mlp/router.{ROUTER_MAP[k]}"] = p.data.clone()
    return out


def reference(zoo: Path, mingle_git: Path, out: Path, dtype: str) -> None:
    import importlib
    from copy import deepcopy

    import torch
    from fusion_bench.models.we_moe import WeightEnsemblingMoE
    from safetensors.torch import save_file

    torch.set_default_dtype(getattr(torch, dtype))  # the references' gates are nn.Linear of the default dtype
    cfg, load = _models(zoo, dtype)
    tasks = json.loads((zoo / "config.json").read_text())["tasks"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, cfg.image_size, cfg.image_size, generator=gen, dtype=torch.float64).to(
        getattr(torch, dtype)
    )
    tensors = {"x": x}
    for depth in (0, 1, 2):  # fresh models: WeightEnsemblingMoE freezes the base MLP, and drops the
        base, experts = load("pretrained"), [load(t) for t in tasks]  # experts' frozen parameters after
        moe = deepcopy(base).requires_grad_(False)  # FusionBench's task_arithmetic_merge: θ₀ + λ·Σ τ_i
        with (
            torch.no_grad()
        ):  # (its strict state_dict_add refuses Parameter + Tensor in 0.2.33; same sum here)
            sds = [e.state_dict() for e in experts]
            for k, p in moe.state_dict().items():
                p.copy_(p + 0.3 * sum(sd[k] - p for sd in sds))
        for i, layer in enumerate(moe.vision_model.encoder.layers):
            layer.mlp = WeightEnsemblingMoE(cfg.hidden_size, base.vision_model.encoder.layers[i].mlp,
                                            [e.vision_model.encoder.layers[i].mlp for e in experts], init_lambda=0.3,
                                            batch_first=True, router_hidden_layers=depth, batch_reduce=True)  # fmt: skip
        tensors.update({f"joint{depth}/{k}": v for k, v in _routers(moe, gen).items()})
        for br in (True, False):
            for layer in moe.vision_model.encoder.layers:
                layer.mlp.batch_reduce = br
            with torch.no_grad():
                tensors[f"joint{depth}/out_br{int(br)}"] = moe(x).contiguous()
    # the MINGLE authors' continual LoRA-WEMoE, its modules read from their repository
    pkg = out.parent / "mingle_ref"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text("")
    for f in ("utils.py", "c_wemoe.py"):
        src = subprocess.run(["git", f"--git-dir={mingle_git}", "show", f"HEAD:fusion_bench/method/mingle/{f}"],
                             check=True, capture_output=True, text=True).stdout  # fmt: skip
        # their fork's fusion_bench has gpu_mem_context (used by their TTA only); 0.2.33 does not
        (pkg / f).write_text(src.replace("import gpu_mem_context, timeit_context", "import timeit_context"))
    sys.path.insert(0, str(pkg.parent))
    cw = importlib.import_module("mingle_ref.c_wemoe")
    base = load("pretrained")
    moe = deepcopy(base)
    for step, t in enumerate(TASKS3):
        tm = load(t)
        moe = cw.task_arithmetic_merge_attn(deepcopy(moe), deepcopy(base), deepcopy(tm), scaling_factor=0.3)
        moe.requires_grad_(False)
        for i in range(cfg.num_hidden_layers):
            base_mlp, expert_mlp = (
                base.vision_model.encoder.layers[i].mlp,
                tm.vision_model.encoder.layers[i].mlp,
            )
            lora = cw.LoRAMLP(base_mlp, expert_mlp, rank=64 if step == 0 else 16)
            layer = moe.vision_model.encoder.layers[i]
            if step == 0:
                layer.mlp = cw.SkipTVWEMoE(cfg.hidden_size, base_mlp, [lora], init_lambda=0.3, batch_first=True,
                                           router_hidden_layers=1, batch_reduce=True)  # fmt: skip
            else:
                layer.mlp = cw.append_expert_and_rebuild_gate(layer.mlp, lora, 0.3, "cpu")
    tensors.update({f"cont/{k}": v for k, v in _routers(moe, gen).items()})
    with torch.no_grad():
        tensors["cont/out"] = moe(x).contiguous()
    save_file(tensors, out)


def ours(zoo: Path, ref: Path, dtype: str) -> dict:
    from types import SimpleNamespace

    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import load_file
    from torch.func import functional_call

    from otmf_exp.merging import MethodContext, TaskInput
    from otmf_exp.merging.wemoe.wemoe import WEMoE
    from otmf_exp.merging.wemoe.wemoe_config import WEMoEConfig

    cfg, load = _models(zoo, dtype)
    r = load_file(ref)
    module = load("pretrained")
    pre = {k: v.clone() for k, v in module.state_dict().items()}
    bb = SimpleNamespace(module=module, modality="vision", mergeable_names=lambda: list(pre), batch_size=16)
    tasks = json.loads((zoo / "config.json").read_text())["tasks"]

    def run(protocol: str, names: list[str], key: str, **kw) -> torch.Tensor:
        mcfg = OmegaConf.structured(WEMoEConfig(max_steps=0, **kw))
        m = WEMoE(mcfg, MethodContext(bb, torch.device("cpu"), torch.Generator(), progress=False), protocol)
        inputs = [TaskInput(t, i, dict(load(t).state_dict()), None, None) for i, t in enumerate(names)]
        state = m.joint(pre, inputs) if protocol == "joint" else m.init(pre)
        if protocol == "continual":
            for task in inputs:
                state = m.step(state, task, pre)
        for k, v in r.items():
            if k.startswith(f"{key}/") and "/router." in k:
                name = k[len(key) + 1 :]
                assert state.extra[name].shape == v.shape, (name, state.extra[name].shape, v.shape)
                state.extra[name] = v
        with torch.no_grad(), m.forward_context(state):
            return functional_call(module, m.merged(state, pre), (r["x"],))

    res = {}
    for depth in (0, 1, 2):
        for br in (True, False):
            y = run("joint", tasks, f"joint{depth}", router_hidden_layers=depth, eval_batch_reduce=br)
            res[f"joint depth={depth} batch_reduce={br}"] = float(
                (y - r[f"joint{depth}/out_br{int(br)}"]).abs().max()
            )
    y = run("continual", TASKS3, "cont")
    res["continual LoRA-WEMoE (3 tasks, ranks 64/16/16)"] = float((y - r["cont/out"]).abs().max())
    res["output scale (max |y|)"] = float(r["cont/out"].abs().max())
    return res


def main() -> None:
    if sys.argv[1] == "--ours":
        print(sys.argv[4], json.dumps(ours(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]), indent=1))
        return
    zoo = Path(sys.argv[1])
    if len(sys.argv) < 3:
        sys.exit("usage: .venv-parity/bin/python scripts/compare/wemoe_fusionbench.py ZOO MINGLE_GIT_DIR")
    mingle = Path(sys.argv[2])
    for dtype in ("float32", "float64"):  # float64: the arithmetic is the same, not only close
        with tempfile.TemporaryDirectory() as tmp:
            ref = Path(tmp) / "ref.safetensors"
            reference(zoo, mingle, ref, dtype)
            py = ROOT / ".venv" / "bin" / "python"
            subprocess.run([str(py), __file__, "--ours", str(zoo), str(ref), dtype], check=True)


if __name__ == "__main__":
    main()
