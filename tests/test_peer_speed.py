"""The peer table's speed-ups of the data-free joint merges give the old code path's bits and hold less memory."""

from __future__ import annotations

import weakref

import pytest
import torch

from otmf_exp.merging import TSVM, Averaging, MagMax
from otmf_exp.merging.base import MergeMethod, MethodContext, TaskInput
from otmf_exp.merging.task_arithmetic import tsvm as tsvm_mod
from otmf_exp.merging.task_arithmetic.magmax import maxabs
from otmf_exp.merging.task_vectors import scale, task_vector

SHAPES = {"a.weight": (6, 4), "b.bias": (4,), "c.weight": (3, 5), "d.scale": ()}


def zoo(tasks: int = 5, seed: int = 0) -> tuple[dict, list[dict]]:
    """θ₀ and θ_t with the awkward values: −0 task vectors, equal magnitudes of opposite sign."""
    g = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(tasks)]
    for ft in fts:
        ft["a.weight"][0, 0] = pre["a.weight"][0, 0]  # τ = +0 ...
    fts[0]["b.bias"][0] = 0.0
    pre["b.bias"][0] = 0.0
    for i, ft in enumerate(fts[1:]):  # |τ| ties across tasks, of either sign
        ft["b.bias"][1] = pre["b.bias"][1] + (0.25 if i % 2 else -0.25)
    fts[0]["c.weight"][0, 0] = -0.0
    pre["c.weight"][0, 0] = 0.0  # ... and τ = −0 − 0 = −0
    return pre, fts


def inputs(fts: list[dict], owned: bool = True) -> list[TaskInput]:
    return [
        TaskInput(f"t{i}", i, {k: v.clone() for k, v in w.items()}, None, None, owned=owned)
        for i, w in enumerate(fts)
    ]


def method(cls: type[MergeMethod], **cfg) -> MergeMethod:
    ctx = MethodContext(
        backbone=None, device=torch.device("cpu"), generator=torch.Generator(), progress=False
    )
    return cls(cls.Config(**cfg), ctx, "joint")


def assert_same_bits(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k].view(torch.int32), want[k].view(torch.int32)), k  # −0 ≠ +0 here


@pytest.mark.parametrize("owned", [True, False])
@pytest.mark.parametrize("tasks", [1, 2, 7])
def test_averaging_joint_bits_of_the_fold(owned: bool, tasks: int) -> None:
    pre, fts = zoo(tasks)
    m = method(Averaging)
    old = MergeMethod.joint(m, pre, inputs(fts, owned))  # the fold of step(), the old joint
    new = m.joint(pre, iter(inputs(fts, owned)))
    assert new.step == old.step == tasks
    assert_same_bits(new.merged, old.merged)
    if tasks == 1:  # τ = −0 at c.weight[0, 0]; 1·τ + 0 is +0, as the fold from τᵐ = 0 gives
        assert not torch.signbit(new.merged["c.weight"][0, 0])


def test_averaging_joint_of_no_task_is_zero() -> None:
    pre, _ = zoo(1)
    got = method(Averaging).joint(pre, [])
    assert got.step == 0 and all(torch.equal(v, torch.zeros_like(pre[k])) for k, v in got.merged.items())


def test_averaging_joint_allocates_no_weight_sized_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_zeros(sd):
        raise AssertionError("the joint fold built a τᵐ = 0 model")

    monkeypatch.setattr("otmf_exp.merging.base.zeros_like", no_zeros)
    pre, fts = zoo(4)
    tasks = inputs(fts)
    own = {v.untyped_storage().data_ptr() for t in tasks for v in t.weights.values()}
    got = method(Averaging).joint(pre, tasks)
    assert {v.untyped_storage().data_ptr() for v in got.merged.values()} <= own


@pytest.mark.parametrize("owned", [True, False])
def test_magmax_joint_bits_of_the_old_fold(owned: bool) -> None:
    pre, fts = zoo(6)
    running = None
    for tv in (task_vector(ft, pre) for ft in fts):  # the old joint: maxabs into new dicts, then scale
        running = tv if running is None else maxabs(running, tv)
    want = scale(running, 0.7)
    tasks = inputs(fts, owned)
    own = {v.untyped_storage().data_ptr() for t in tasks for v in t.weights.values()}
    got = method(MagMax, scaling=0.7).joint(pre, iter(tasks))
    assert got.step == 6
    assert_same_bits(got.merged, want)
    if owned:  # written into the first task's buffers: no weight-sized tensor per task
        assert {v.untyped_storage().data_ptr() for v in got.merged.values()} <= own


def test_tsvm_joint_bits_of_the_old_path_and_frees_each_key(monkeypatch: pytest.MonkeyPatch) -> None:
    pre, fts = zoo(3)
    tvs = [task_vector(ft, pre) for ft in fts]
    matrices = {k for k, v in pre.items() if v.dim() == 2}
    want = {k: 0.8 * v for k, v in tsvm_mod.tsv_merge(tvs, matrices).items()}  # the old joint

    tasks = (t for t in inputs(fts))  # the runner's stream: nobody else keeps the task vectors
    alive: list[tuple[str, weakref.ref]] = []
    seen: list[str] = []
    real = tsvm_mod.tsv_merge_matrix

    def spy(taus, dtype=None):
        key = next(k for k in SHAPES if SHAPES[k] == tuple(taus[0].shape))
        seen.append(key)
        alive.extend((key, weakref.ref(t)) for t in taus)
        earlier = [k for k, r in alive if k != key and r() is not None]
        assert not earlier, f"task vectors of {earlier[0]} still alive while merging {key}"
        return real(taus, dtype)

    monkeypatch.setattr(tsvm_mod, "tsv_merge_matrix", spy)
    got = method(TSVM, alpha=0.8).joint(pre, tasks)
    assert seen == ["a.weight", "c.weight"]
    assert_same_bits(got.merged, want)


@pytest.mark.parametrize("cls", [Averaging, MagMax])
def test_sliced_folds_bits_with_many_slices_and_a_strided_tensor(
    cls, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("otmf_exp.merging.task_arithmetic.streaming.CHUNK", 5)  # 24 = 5+5+5+5+4
    pre, fts = zoo(4)
    pre["e.weight"] = torch.randn(5, 3).T  # not contiguous: one whole-tensor pass
    for i, ft in enumerate(fts):
        ft["e.weight"] = (pre["e.weight"] + i).T.contiguous().T
    m = method(cls)
    if cls is Averaging:
        want = MergeMethod.joint(m, pre, inputs(fts)).merged
    else:
        running = None
        for tv in (task_vector(ft, pre) for ft in fts):
            running = tv if running is None else maxabs(running, tv)
        want = scale(running, 0.5)
    assert_same_bits(m.joint(pre, iter(inputs(fts))).merged, want)


@pytest.mark.parametrize("cls", [Averaging, MagMax])
def test_folds_free_each_task_vector_before_the_next_load(cls) -> None:
    """The runner's stream keeps the last task until it yields the next one: the fold must not leave
    τ_t alive in it while θ_{t+1} is loaded (one model copy less at the peak)."""
    pre, fts = zoo(4)
    refs: list[list[weakref.ref]] = []
    leaked: list[int] = []

    def stream():
        for i, task in enumerate(inputs(fts)):
            if i >= 2:  # task 0's buffers became τᵐ; task 1's must be free by now
                leaked.extend(i - 1 for r in refs[i - 1] if r() is not None)
            refs.append([weakref.ref(v) for v in task.weights.values()])
            yield task

    method(cls).joint(pre, stream())
    assert not leaked, f"τ of task {leaked[0]} alive while the next task is loaded"
