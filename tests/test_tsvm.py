"""TSV-Merge: per-matrix truncated SVDs, whitening of the concatenated bases, means elsewhere."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from otmf_exp.config import validate_method
from otmf_exp.errors import UserError
from otmf_exp.merging.base import MethodContext, TaskInput
from otmf_exp.merging.task_arithmetic.tsvm import TSVM, TSVMConfig, tsv_merge_matrix, tsv_rank

T = torch.tensor
C, S = math.cos(math.pi / 8), math.sin(math.pi / 8)
# τ_1 = 3·e1 e1ᵀ, τ_2 = 2·u e2ᵀ with u = (e1 + e2)/√2; T = 2, k = 2, r = 1 direction each:
# U = [e1, u] (columns 45° apart), Vᵀ = [e1ᵀ; e2ᵀ] = I. The polar factor of U turns its columns
# symmetrically to 90° apart: [(cos 22.5°, −sin 22.5°), (sin 22.5°, cos 22.5°)]; of Vᵀ: I. So
# merged = [3·(c, −s), 2·(s, c)] as columns.
U2 = T([1.0, 1.0]) / math.sqrt(2.0)
TAU1 = 3.0 * torch.outer(T([1.0, 0.0]), T([1.0, 0.0]))
TAU2 = 2.0 * torch.outer(U2, T([0.0, 1.0]))
EXPECTED = T([[3 * C, 2 * S], [-3 * S, 2 * C]])
PRE = {"w": T([[0.5, -1.0], [2.0, 0.25]]), "e": T([[1.0, 1.0], [0.0, 1.0]]), "b": T([1.0, -1.0])}


class _Backbone:  # linear_weight_names(): which 2-D tensors belong to nn.Linear (only "w" here)
    @staticmethod
    def linear_weight_names():
        return {"w"}


def _ctx(record=lambda k, v: None):
    return MethodContext(_Backbone(), torch.device("cpu"), torch.Generator(), record=record)


def _tasks():
    tvs = [{"w": TAU1, "e": TAU1, "b": T([1.0, 2.0])}, {"w": TAU2, "e": TAU2, "b": T([3.0, -2.0])}]
    return [
        TaskInput(f"t{i}", i, {k: PRE[k] + v for k, v in tv.items()}, None, None) for i, tv in enumerate(tvs)
    ]


def test_whitened_concatenation_closed_form():
    out = tsv_merge_matrix([TAU1, TAU2])
    assert torch.allclose(out, EXPECTED, atol=1e-6), out
    assert torch.allclose(tsv_merge_matrix([TAU1.double(), TAU2.double()]), EXPECTED.double(), atol=1e-12)
    # without whitening the two kept directions would simply add: TAU1 + TAU2 (not orthogonal)
    assert not torch.allclose(out, TAU1 + TAU2, atol=1e-3)


def test_rank_is_the_reference_arithmetic():
    assert tsv_rank(768, 8) == 96 and tsv_rank(17, 8) == 2
    assert tsv_rank(49, 49) == 0  # int(49 · (1/49)) = int(0.999…) — FusionBench's rounding, kept
    # T > k keeps no direction: the matrix merges to zero, as in the reference
    three = [TAU1, TAU2, TAU1]
    assert tsv_rank(2, 3) == 0 and torch.equal(tsv_merge_matrix(three), torch.zeros(2, 2))


@pytest.mark.parametrize(
    "kw,svd_e",
    [({}, True), ({"matrices": "linear"}, False), ({"exclude_keys": ["e"]}, False)],
)
def test_joint_matrices_means_and_alpha(kw, svd_e):
    seen = {}
    m = TSVM(OmegaConf.structured(TSVMConfig(alpha=0.5, **kw)), _ctx(seen.__setitem__), protocol="joint")
    state = m.joint(PRE, _tasks())
    assert state.step == 2 and seen["alpha"] == 0.5
    assert torch.allclose(state.merged["w"], 0.5 * EXPECTED, atol=1e-6)
    e = 0.5 * EXPECTED if svd_e else 0.5 * (TAU1 + TAU2) / 2  # a 2-D embedding: SVD rule or mean
    assert torch.allclose(state.merged["e"], e, atol=1e-6), (kw, state.merged["e"])
    assert torch.equal(state.merged["b"], T([1.0, 0.0]))  # 0.5 · mean([1, 2], [3, −2])
    assert seen["tsvm_matrices"] == (2 if svd_e else 1)


@pytest.mark.parametrize(
    "override,match",
    [({"alpha": -1.0}, "alpha"), ({"matrices": "conv"}, "matrices"), ({"svd_dtype": "half"}, "svd_dtype")],
)
def test_bad_values_are_one_line_errors(override, match):
    with pytest.raises(UserError, match=match):
        validate_method(TSVM, OmegaConf.merge(OmegaConf.structured(TSVMConfig), override))


def test_unknown_exclude_key_is_refused():
    m = TSVM(OmegaConf.structured(TSVMConfig(exclude_keys=["nope"])), _ctx(), protocol="joint")
    with pytest.raises(UserError, match="exclude_keys"):
        m.joint(PRE, _tasks())


def test_published_row_mapping():
    from otmf_exp.reporting.tables import reference_method

    assert reference_method("tsvm", {"alpha": 1.0, "matrices": "all_2d", "exclude_keys": None}) == "tsvm"
    assert reference_method("tsvm", {"alpha": 0.5}) is None
    assert reference_method("tsvm", {"matrices": "linear"}) is None
