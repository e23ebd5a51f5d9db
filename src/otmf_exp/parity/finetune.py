"""Parity rows: ``method=continual_finetune`` (full and LoRA) against FusionBench 0.2.33's
``ContinualImageClassificationFineTuningForCLIP``, whose ``run()`` is called unchanged on the zoo's θ₀.

Both sides train on the same batches (ours recorded, served by the reference's ``DataLoader``), from
the same LoRA adapters (ours, copied into FusionBench's peft model; dropout 0 on both sides: dropout
masks come from each side's own RNG stream). Compared: the loss of every step and the vision weights
after every task.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import Tensor

from otmf_exp.parity.adamerging import setup
from otmf_exp.parity.core import F64_WHY, Case

TASKS = ["rot90", "flip", "invert"]
STEPS, BATCH = 8, 16
#: the attention key bias adds q·b to every score of a query: softmax ignores it, so its true gradient
#: is 0 and each side's Adam turns its own float noise into ±lr steps; left out of the comparison
ZERO_GRAD = ".k_proj.bias"


def _finetune(lora: bool, key: str, dtype: torch.dtype = torch.float32):
    def ours(zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
        from otmf_exp.merging.finetune.continual_finetune import ContinualFinetune, ContinualFinetuneConfig

        s = setup(zoo_dir, TASKS, dtype)
        cfg = OmegaConf.structured(ContinualFinetuneConfig(steps=STEPS, batch_size=BATCH))
        cfg.lora.enabled, cfg.lora.dropout = lora, 0.0
        curve: list[float] = []

        def record(k: str, v: object) -> None:
            if k == "loss_curve":
                curve.extend(v)

        method = ContinualFinetune(cfg, s.ctx(record=record))
        if lora:  # the adapters our step 1 starts from (same seed, same first draw)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(method.ctx.seed_for("continual_finetune", 1, "rng"))
                with method._adapters({}) as adapters:
                    init = {f"lora/{n}": p.detach().to(dtype).clone() for n, p in adapters.items()}
            save_file(init, str(work_dir / f"{key}.lora_init.safetensors"))
        state, out = method.init(s.pre), {}
        for i, t in enumerate(TASKS):
            state = method.step(state, s.task(i, t, weights=False), s.pre)
            w = method.merged(state, s.pre)
            out.update({f"weights/task{i}/{k}": v for k, v in w.items() if not k.endswith(ZERO_GRAD)})
        s.save_batches(work_dir / f"{key}.batches.safetensors")
        spec = {"tasks": TASKS, "steps": STEPS, "batch_size": BATCH, "lr": cfg.lr, "lora": lora,
                "dtype": str(dtype).removeprefix("torch.")}  # fmt: skip
        (work_dir / f"{key}.spec.json").write_text(json.dumps(spec))
        out["loss"] = torch.tensor(curve, dtype=torch.float64)
        return out

    return ours


REF = "otmf_exp.parity.reference.finetune"
_SET = f"3 tasks ({', '.join(TASKS)}), {STEPS} steps each, batch {BATCH}, Adam lr 1e-5, cosine"
_WHY = (
    "same batches and adapters; float32 rounding of the two towers' forward (transformers 4 vs 5 CLIP code: "
    "the first loss already differs by ≈ 3 ulp on an AVX-512 CPU, 0 on the machine of the first "
    "measurement), which each side's Adam (24 steps, lr 1e-5) carries into the weights: measured 1.4e-6 "
    "(full) and 8.3e-7 (LoRA), the float64 rows agree; k_proj.bias left out (true gradient 0: Adam turns "
    "each side's float noise into ±lr steps)"
)
CASES: list[Case] = [
    Case("continual_finetune", "continual_finetune", f"full, {_SET}",
         "ContinualImageClassificationFineTuningForCLIP", "loss every step, weights after every task",
         5e-6, _WHY, _finetune(False, "cft_full"), f"{REF}:full"),
    Case("continual_finetune_f64", "continual_finetune", f"full, {_SET}, float64",
         "ContinualImageClassificationFineTuningForCLIP", "loss every step, weights after every task",
         1e-10, F64_WHY, _finetune(False, "cft_full", torch.float64), f"{REF}:full", "float64"),
    Case("continual_finetune_lora", "continual_finetune", f"lora r16 q/v dropout 0, {_SET}",
         "ContinualImageClassificationFineTuningForCLIP (use_lora)", "loss every step, weights after every task",
         5e-6, _WHY, _finetune(True, "cft_lora"), f"{REF}:lora"),
    Case("continual_finetune_lora_f64", "continual_finetune", f"lora r16 q/v dropout 0, {_SET}, float64",
         "ContinualImageClassificationFineTuningForCLIP (use_lora)", "loss every step, weights after every task",
         1e-10, F64_WHY, _finetune(True, "cft_lora", torch.float64), f"{REF}:lora", "float64"),
]  # fmt: skip
