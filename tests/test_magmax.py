"""MagMax: max-magnitude selection, ties to the later task, joint == continual."""

import pytest
import torch
from omegaconf import OmegaConf

from otmf_exp.config import validate_method
from otmf_exp.errors import UserError
from otmf_exp.merging.base import MethodContext, TaskInput
from otmf_exp.merging.task_arithmetic.magmax import MagMax, MagMaxConfig, maxabs

CTX = MethodContext(backbone=None, device=torch.device("cpu"), generator=torch.Generator())
T = torch.tensor
PRE = {"x": T([1.0, 1.0, 1.0])}
TVS = [T([1.0, -3.0, 2.0]), T([-2.0, 3.0, 1.0]), T([0.5, -3.0, -2.0])]


def _tasks():
    return [TaskInput(f"t{i}", i, {"x": PRE["x"] + tv}, None, None) for i, tv in enumerate(TVS)]


def test_maxabs_tie_goes_to_second_argument():
    a, b = {"x": T([2.0, -1.0, 3.0])}, {"x": T([-2.0, 0.5, 1.0])}
    assert torch.equal(maxabs(a, b)["x"], T([-2.0, -1.0, 3.0]))


def test_joint_closed_form_with_ties():
    # |.|: x0 -> -2 (τ2); x1 ties 3,3,3 -> τ3 (-3); x2 ties 2 vs |-2| -> τ3 (-2); times λ = 0.5
    state = MagMax(MagMaxConfig(scaling=0.5), CTX, protocol="joint").joint(PRE, _tasks())
    assert torch.equal(state.merged["x"], T([-1.0, -1.5, -1.0]))
    assert state.step == 3


def test_continual_per_step_closed_form():
    m = MagMax(MagMaxConfig(scaling=0.5), CTX)
    state = m.init(PRE)
    expected = [T([0.5, -1.5, 1.0]), T([-1.0, 1.5, 1.0]), T([-1.0, -1.5, -1.0])]  # ties -> later task
    for task, exp in zip(_tasks(), expected):
        state = m.step(state, task, PRE)
        assert torch.equal(state.merged["x"], exp)
    assert torch.equal(m.merged(state, PRE)["x"], PRE["x"] + T([-1.0, -1.5, -1.0]))


def test_continual_matches_definition_for_non_dyadic_scaling():
    lam = 0.3
    g = torch.Generator().manual_seed(0)
    tvs = [torch.randn(50, generator=g) for _ in range(4)]
    m = MagMax(MagMaxConfig(scaling=lam), CTX)
    pre = {"x": torch.zeros(50)}
    state, ref = m.init(pre), torch.zeros(50)
    for i, tv in enumerate(tvs):
        state = m.step(state, TaskInput(f"t{i}", i, {"x": tv}, None, None), pre)
        prev = ref / lam
        ref = lam * torch.where(tv.abs() >= prev.abs(), tv, prev)  # θ0 + λ·maxabs((θ−θ0)/λ, τ_t)
        assert torch.allclose(state.merged["x"], ref, atol=1e-7)


def test_zero_scaling_gives_pretrained_without_nan():
    m = MagMax(MagMaxConfig(scaling=0.0), CTX)
    state = m.init(PRE)
    for task in _tasks():
        state = m.step(state, task, PRE)
    assert torch.equal(state.merged["x"], torch.zeros(3))


def test_validate_rejects_negative_scaling():
    cfg = OmegaConf.structured(MagMaxConfig)
    cfg.scaling = -0.5
    with pytest.raises(UserError, match="scaling"):
        validate_method(MagMax, cfg)
