"""The data-driven rows' own logic (fast tier, no reference venv): batch recording, coefficient
columns, the float64 patch, and that every row names a reference function that exists."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import torch

from otmf_exp.data.base import TensorTaskData
from otmf_exp.parity import adamerging as pa

MODULES = ["adamerging", "concrete", "wemoe", "finetune"]
SRC = Path(pa.__file__).resolve().parent


def _data() -> TensorTaskData:
    x = torch.arange(20, dtype=torch.float32)[:, None]
    return TensorTaskData("t", {"test": (x, torch.arange(20) % 2)}, ["a", "b"])


def test_recorder_keeps_exactly_the_batches_served_in_order():
    rec = pa.Recorder(_data())
    it = rec.batches("test", 4, seed=3)
    drawn = [next(it)["inputs"] for _ in range(7)]  # beyond one pass: the reshuffled second epoch
    assert len(rec.served) == 7
    assert all(torch.equal(a, b[0]) for a, b in zip(drawn, rec.served))
    plain = _data().batches("test", 4, seed=3)
    assert all(torch.equal(next(plain)["inputs"], d) for d in drawn)  # the data are unchanged
    assert rec.name == "t"


def test_coefficients_per_step_and_column_float32_drops_the_zero_gradient_bias():
    keys = ["a.weight", "l.self_attn.k_proj.bias", "b.bias"]
    trace = [torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])]
    f32 = pa.coefficients(trace, keys, torch.float32)
    assert set(f32) == {"coef/step0/a.weight", "coef/step0/b.bias"}
    assert torch.equal(f32["coef/step0/b.bias"], torch.tensor([3.0, 6.0]))
    assert set(pa.coefficients(trace, keys, torch.float64)) == {f"coef/step0/{k}" for k in keys}
    assert set(pa.coefficients([torch.tensor([0.3, 0.4])], keys, torch.float32)) == {"coef/step0"}


def test_float64_adaptation_patches_and_restores():
    from otmf_exp.merging.adamerging import adamerging as am

    init, ent = am.init_coefficients, am.entropy_loss
    with pa.float64_adaptation(am):
        c = am.init_coefficients(2, 3, "layer", [0.3, 0.3])
        assert c.dtype == torch.float64 and c.requires_grad and c.is_leaf
        z = torch.randn(4, 5, dtype=torch.float64)
        assert am.entropy_loss(z, 1e-8).dtype == torch.float64
        assert torch.allclose(am.entropy_loss(z, 1e-8), ent(z, 1e-8).double(), atol=1e-6)
    assert am.init_coefficients is init and am.entropy_loss is ent


@pytest.mark.parametrize("module", MODULES)
def test_every_row_names_an_existing_reference_function_and_a_measured_bound(module):
    cases = importlib.import_module(f"otmf_exp.parity.{module}").CASES
    assert cases and len({c.name for c in cases}) == len(cases)
    for c in cases:
        mod, fn = c.theirs.split(":")
        assert mod == f"otmf_exp.parity.reference.{module}", c.theirs
        ref = ast.parse((SRC / "reference" / f"{module}.py").read_text())
        assert fn in {n.name for n in ref.body if isinstance(n, ast.FunctionDef)}, c.theirs
        assert 0 < c.bound < 1 and c.why and callable(c.ours)
        assert c.dtype in ("float32", "float64") and (c.dtype == "float64") == c.name.endswith("_f64")


@pytest.mark.parametrize("module", MODULES + ["zoo"])
def test_reference_modules_import_only_the_allowed_packages(module):
    allowed = {"torch", "transformers", "safetensors", "peft", "fusion_bench", "omegaconf", "lightning",
               "__future__", "json", "pathlib", "typing", "types", "copy", "importlib", "collections", "contextlib"}  # fmt: skip
    tree = ast.parse((SRC / "reference" / f"{module}.py").read_text())
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        for n in names:
            assert n.split(".")[0] in allowed or n.startswith("otmf_exp.parity.reference"), (module, n)
