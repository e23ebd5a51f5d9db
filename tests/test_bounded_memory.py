"""Bounded memory as properties (timings live in scripts/bench.py, not here).

For every method with a continual protocol, on the synthetic tiny CLIP tower:
  * ``constant`` methods: the carried state's weight-sized part is exactly one task vector at every
    step and its other tensors do not grow with T;
  * ``per_task`` methods (MINGLE): the carried tensors grow at every step by exactly what the method
    declares (``state_growth_bytes``), and hold no full task vector;
  * per-task extras are one head per task seen and O(1) scalars per task;
  * a step keeps no reference to the task's fine-tuned weights (no θ_t survives its step).
"""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch

from otmf_exp.config import method_config
from otmf_exp.merging import METHODS, MethodContext, TaskInput
from otmf_exp.merging.task_vectors import num_bytes
from otmf_exp.offline.synthetic import SyntheticBackbone

FAST = {
    "adamerging": ["method.steps=2", "method.batch_size=4"],
    "dop": ["method.steps=2"],
    "otmf": [
        "method.iterations=2",
        "method.batch_size=4",
        "method.eval_batches=1",
        "method.head_tuning.steps=2",
    ],
    "mingle": ["method.max_steps=2", "method.batch_size=4"],
    "continual_finetune": ["method.steps=2", "method.batch_size=4"],
    # the first expert's rank equals the later ones' so every step grows alike (the default 64-then-16
    # growth, step by step: tests/test_wemoe.py)
    "wemoe": ["method.max_steps=2", "method.batch_size=4", "method.lora_rank_first=16"],
}
CONTINUAL = sorted(n for n, cls in METHODS.items() if "continual" in cls.protocols and n != "individual")
T = 6


@pytest.fixture(scope="module")
def backbone():
    bb = SyntheticBackbone("tiny", "cpu")
    bb.batch_size = 16
    return bb


@pytest.mark.parametrize("name", CONTINUAL)
def test_carried_state_grows_only_as_declared(name, backbone, make_cfg):
    bb = backbone
    cfg = method_config(make_cfg(f"method={name}", *FAST.get(name, [])))
    method = METHODS[name](
        cfg,
        MethodContext(bb, torch.device("cpu"), torch.Generator().manual_seed(0), progress=False),
        "continual",
    )
    pre = bb.pretrained_state()
    names = [f"t{i}" for i in range(T)]
    sizes = {"train": 16, "validation": 8, "test": 16}
    datas = {n: bb.task_data(n, sizes) for n in names}
    state = method.init(pre)
    w = num_bytes(pre)
    growth = method.state_growth_bytes(pre)
    constant = METHODS[name].state_growth == "constant"
    assert (growth == 0) == constant, f"{name}: declares {METHODS[name].state_growth} growth of {growth} B"
    carried = [num_bytes(state.merged) + num_bytes(state.extra)]
    head_bytes = 10 * (16 + 1) * 4  # 10 classes x (projection dim 16 + a tuned bias column), float32
    scalar_sizes = []
    for i, n in enumerate(names):
        weights = bb.load_finetuned(n)
        refs = [weakref.ref(v) for v in weights.values()]
        task = TaskInput(
            n,
            i,
            weights,
            bb.zero_shot_head(datas[n]),
            datas[n],
            datas[names[i - 1]] if i else None,
            {m: datas[m] for m in names[: i + 1]},
        )
        state = method.step(state, task, pre)
        del task, weights
        gc.collect()
        assert not any(r() is not None for r in refs), (
            f"{name} keeps the fine-tuned weights of step {i + 1} alive"
        )
        assert state.step == i + 1
        carried.append(num_bytes(state.merged) + num_bytes(state.extra))
        if constant:
            assert set(state.merged) == set(pre)
            assert num_bytes(state.merged) == w, (
                f"{name}: merged state is not exactly one task vector at step {i + 1}"
            )
            assert num_bytes(state.extra) == carried[1] - w, f"{name}: extra tensors grow at step {i + 1}"
        else:
            assert carried[-1] - carried[-2] == growth, (
                f"{name}: state grew by {carried[-1] - carried[-2]} B at step {i + 1}, declared {growth} B"
            )
            assert num_bytes(state.merged) < w  # the growing part is not a stack of task vectors
        assert len(state.heads) <= i + 1
        assert all(h.numel() * h.element_size() <= head_bytes for h in state.heads.values())
        scalar_sizes.append(len(json.dumps(state.scalars)))
    # scalars: at most a few numbers per task (OPCM keeps one norm per task), never weight-sized
    assert scalar_sizes[-1] - scalar_sizes[0] <= 64 * (T - 1)
    assert scalar_sizes[-1] < w / 100


def test_owned_task_vector_is_computed_in_place():
    pre = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.5]])}
    w = {"a": torch.tensor([2.0, 0.0]), "b": torch.tensor([[1.5]])}
    ptr = w["a"].data_ptr()
    task = TaskInput("t", 0, w, None, None, owned=True)
    tv = task.task_vector(pre)
    assert torch.equal(tv["a"], torch.tensor([1.0, -2.0])) and torch.equal(tv["b"], torch.tensor([[1.0]]))
    assert tv["a"].data_ptr() == ptr and task.weights is None  # no new weight-sized tensor; θ_t is gone
    assert task.task_vector(pre) is tv  # a second call returns the same τ, never θ_t − 2θ₀ or an error
    assert torch.equal(pre["a"], torch.tensor([1.0, 2.0]))


def test_not_owned_or_tied_task_vector_is_a_copy():
    pre = {"a": torch.tensor([1.0]), "b": torch.tensor([1.0])}
    shared = torch.tensor([3.0])
    for owned, w in (
        (False, {"a": torch.tensor([3.0]), "b": torch.tensor([3.0])}),
        (True, {"a": shared, "b": shared}),
    ):
        task = TaskInput("t", 0, w, None, None, owned=owned)
        tv = task.task_vector(pre)
        assert torch.equal(tv["a"], torch.tensor([2.0])) and torch.equal(tv["b"], torch.tensor([2.0]))
        assert torch.equal(w["a"], torch.tensor([3.0])) and task.weights is w  # inputs untouched
