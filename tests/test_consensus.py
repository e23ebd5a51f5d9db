"""Consensus TA: TALL masks, the consensus count and both protocols pinned against hand-computed results."""

import pytest
import torch
from omegaconf import OmegaConf

from otmf_exp.config import validate_method
from otmf_exp.errors import UserError
from otmf_exp.merging.base import MethodContext, TaskInput
from otmf_exp.merging.task_arithmetic.consensus import Consensus, ConsensusConfig, tall_mask

CTX = MethodContext(backbone=None, device=torch.device("cpu"), generator=torch.Generator())
T = torch.tensor
# θ₀ ≠ 0 (so FusionBench's |θ₀ − τ_i| bug differs) and binary fractions (every sum below is exact)
PRE = {"a": T([0.5, -1.0, 2.0, 0.25])}
TVS = [T([2.0, 1.0, 0.0, -1.0]), T([1.0, -1.0, 0.0, 2.0]), T([-1.0, 1.0, 4.0, 2.0])]
# τ_MTL = [2, 1, 4, 3]; λ_t = 0.5: λ_t·|τ_MTL − τ_i| = [0,0,2,2], [.5,1,2,.5], [1.5,0,0,.5]
#   m_1 = [1,1,0,0]; m_2 = [1,0,0,1] (entry 1 ties 1 = 1: kept only with inclusive); m_3 = [0,1,1,1]
#   counts [2,2,1,2] (inclusive [2,3,1,2])


def _tasks(owned: bool = False):
    return [TaskInput(f"t{i}", i, {"a": PRE["a"] + tv}, None, None, owned=owned) for i, tv in enumerate(TVS)]


def _joint(**kw):
    cfg = ConsensusConfig(scaling=0.5, tall_mask_lambda=0.5, **kw)
    return Consensus(cfg, CTX, protocol="joint").joint(PRE, _tasks())


def test_tall_mask_strict_and_inclusive():
    th0, multi = PRE["a"], PRE["a"] + T([2.0, 1.0, 4.0, 3.0])
    assert tall_mask(th0, th0 + TVS[1], multi, 0.5).tolist() == [True, False, False, True]
    assert tall_mask(th0, th0 + TVS[1], multi, 0.5, inclusive=True).tolist() == [True, True, False, True]


@pytest.mark.parametrize(
    "kw,expected",
    [
        ({"k": 2}, [1.0, 0.5, 0.0, 1.5]),  # keep [1,1,0,1] of τ_MTL, times λ = 0.5
        ({"k": 1}, [1.0, 0.5, 2.0, 1.5]),  # every entry is kept by some task: plain TA
        ({"k": 0}, [1.0, 0.5, 2.0, 1.5]),
        ({"k": 3}, [0.0, 0.0, 0.0, 0.0]),
        ({"k": 3, "inclusive": True}, [0.0, 0.5, 0.0, 0.0]),  # the tie makes entry 1 unanimous
        # FusionBench tall_mask/task_arithmetic.py: |θ₀ − τ_i| = [1.5,2,2,1.25], [.5,0,2,1.75],
        # [1.5,2,2,1.75] -> masks [1,1,0,0], [0,0,0,1], [0,1,1,1] -> counts [1,2,1,2]
        ({"k": 2, "fusionbench_mask_bug": True}, [0.0, 0.5, 0.0, 1.5]),
    ],
)
def test_joint_closed_form(kw, expected):
    state = _joint(**kw)
    assert torch.equal(state.merged["a"], T(expected)), (kw, state.merged["a"])
    assert state.step == 3


def test_continual_mingle_recurrence_closed_form():
    # step 1: τᵐ = 0.5·τ_1 = [1, .5, 0, -.5] (unmasked)
    # step 2: τ_MTL = τᵐ + τ_2 = [2, -.5, 0, 1.5]; m_2 = |τ_2| > .5·|τᵐ| = [1,1,0,1];
    #   ones: consensus = m_2 -> τᵐ + .5·[2, -.5, 0, 1.5] = [2, .25, 0, .25]
    #   tall: m_old = |τᵐ| > .5·|τ_2| = [1,0,0,0] -> counts [2,1,0,1] -> τᵐ + .5·[2,0,0,0] = [2, .5, 0, -.5]
    expected = {"ones": [2.0, 0.25, 0.0, 0.25], "tall": [2.0, 0.5, 0.0, -0.5]}
    for merged_mask, exp in expected.items():
        for owned in (False, True):
            cfg = ConsensusConfig(scaling=0.5, tall_mask_lambda=0.5, merged_mask=merged_mask)
            m = Consensus(cfg, CTX)
            tasks = _tasks(owned)
            state = m.step(m.init(PRE), tasks[0], PRE)
            assert torch.equal(state.merged["a"], T([1.0, 0.5, 0.0, -0.5]))
            state = m.step(state, tasks[1], PRE)
            assert torch.equal(state.merged["a"], T(exp)), (merged_mask, owned, state.merged["a"])
            assert torch.equal(m.merged(state, PRE)["a"], PRE["a"] + T(exp))


def test_protocol_defaults_and_recorded_values():
    seen = {}
    ctx = MethodContext(None, torch.device("cpu"), torch.Generator(), record=seen.__setitem__)
    Consensus(ConsensusConfig(), ctx, protocol="joint").joint(PRE, _tasks())
    assert (seen["scaling"], seen["tall_mask_lambda"]) == (0.3, 0.6)  # TA default, FusionBench's λ_t
    m = Consensus(ConsensusConfig(), ctx)
    m.step(m.init(PRE), _tasks()[0], PRE)
    assert (seen["scaling"], seen["tall_mask_lambda"]) == (0.1, 0.2)  # MINGLE's consensus_ta.yaml
    assert 0.0 <= seen["consensus_kept_fraction"] <= 1.0


@pytest.mark.parametrize(
    "override,match",
    [
        ({"k": -1}, "method.k"),
        ({"tall_mask_lambda": -0.1}, "tall_mask_lambda"),
        ({"scaling": float("nan")}, "scaling"),
        ({"merged_mask": "previous"}, "merged_mask"),
    ],
)
def test_bad_values_are_one_line_errors(override, match):
    cfg = OmegaConf.merge(OmegaConf.structured(ConsensusConfig), override)
    with pytest.raises(UserError, match=match):
        validate_method(Consensus, cfg)


def test_merged_mask_is_refused_in_joint():
    with pytest.raises(UserError, match="continual protocol only"):
        Consensus(ConsensusConfig(merged_mask="tall"), CTX, protocol="joint")


def test_published_row_mapping():
    from otmf_exp.reporting.tables import reference_method

    assert reference_method("consensus", {"k": 2, "scaling": None}) == "consensus_ta"
    assert reference_method("consensus", {"scaling": 0.1, "tall_mask_lambda": 0.2}) == "consensus_ta"
    assert reference_method("consensus", {"merged_mask": "tall"}) is None
    assert reference_method("consensus", {"scaling": 0.3}) is None
