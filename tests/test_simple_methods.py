"""Averaging, task arithmetic, pretrained, individual against hand-computed results."""

import torch

from otmf_exp.merging.base import MethodContext, TaskInput
from otmf_exp.merging.task_arithmetic.averaging import Averaging, running_mean
from otmf_exp.merging.task_arithmetic.task_arithmetic import TaskArithmetic, TaskArithmeticConfig
from otmf_exp.merging.task_vectors import apply, global_norm, task_vector

PRE = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.5, -0.5])}
FT = [
    {"w": torch.tensor([[2.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.5, 0.5])},
    {"w": torch.tensor([[1.0, 0.0], [3.0, 4.0]]), "b": torch.tensor([1.5, -0.5])},
    {"w": torch.tensor([[1.0, 2.0], [6.0, 4.0]]), "b": torch.tensor([0.5, -0.5])},
]
CTX = MethodContext(backbone=None, device=torch.device("cpu"), generator=torch.Generator())


def _tasks():
    return [TaskInput(f"t{i}", i, ft, None, None) for i, ft in enumerate(FT)]


def test_task_vector_and_norm():
    tv = task_vector(FT[0], PRE)
    assert torch.equal(tv["w"], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(tv["b"], torch.tensor([0.0, 1.0]))
    assert global_norm(tv) == 2**0.5


def test_task_arithmetic_continual_equals_joint_closed_form():
    m = TaskArithmetic(TaskArithmeticConfig(scaling=0.5), CTX)
    state = m.init(PRE)
    for t in _tasks():
        state = m.step(state, t, PRE)
    merged = m.merged(state, PRE)
    # θ0 + 0.5 * Σ τ : w += 0.5*([[1,0],[0,0]] + [[0,-2],[0,0]] + [[0,0],[3,0]])
    assert torch.allclose(merged["w"], torch.tensor([[1.5, 1.0], [4.5, 4.0]]))
    assert torch.allclose(merged["b"], torch.tensor([1.0, 0.0]))
    assert state.step == 3


def test_averaging_running_mean_equals_mean_of_weights():
    m = Averaging(None, CTX)
    state = m.init(PRE)
    for t in _tasks():
        state = m.step(state, t, PRE)
    merged = m.merged(state, PRE)
    for k in PRE:
        assert torch.allclose(merged[k], torch.stack([f[k] for f in FT]).mean(0))


def test_running_mean_formula():
    a, b = {"x": torch.tensor([3.0])}, {"x": torch.tensor([6.0])}
    assert running_mean(a, b, 3)["x"].item() == 4.0  # (2*3 + 6)/3


def test_steps_do_not_modify_inputs():
    m = TaskArithmetic(TaskArithmeticConfig(scaling=0.3), CTX)
    pre = {k: v.clone() for k, v in PRE.items()}
    ft = {k: v.clone() for k, v in FT[0].items()}
    state = m.step(m.init(pre), TaskInput("t", 0, ft, None, None), pre)
    assert all(torch.equal(pre[k], PRE[k]) and torch.equal(ft[k], FT[0][k]) for k in PRE)
    assert torch.allclose(apply(pre, state.merged)["w"], PRE["w"] + 0.3 * task_vector(FT[0], PRE)["w"])
