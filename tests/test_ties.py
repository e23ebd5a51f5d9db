"""TIES-Merging: every named variant pinned against hand-computed results."""

import pytest
import torch
from omegaconf import OmegaConf

from otmf_exp.config import validate_method
from otmf_exp.errors import UserError
from otmf_exp.merging.base import MethodContext, TaskInput
from otmf_exp.merging.sparsify import elect_signs, kth_threshold, trim
from otmf_exp.merging.task_arithmetic.ties import Ties, TiesConfig, ties_merge

CTX = MethodContext(backbone=None, device=torch.device("cpu"), generator=torch.Generator())
T = torch.tensor

# three task vectors over two tensors: "a" [4] and "b" [2]
TVS = [
    {"a": T([4.0, -1.0, 0.5, 2.0]), "b": T([-3.0, 0.1])},
    {"a": T([-2.0, 3.0, 0.2, -1.0]), "b": T([1.0, -0.5])},
    {"a": T([1.0, -0.3, -6.0, 0.4]), "b": T([2.0, 0.05])},
]

# density 0.5. global (d = 6, kth = 6 - 3 = 3rd smallest |τ|, keep >=):
#   τ1 thr 1   -> a [4,-1,0,2]   b [-3,0]
#   τ2 thr 1   -> a [-2,3,0,-1]  b [1,0]     (tie at 1: both kept)
#   τ3 thr 0.4 -> a [1,0,-6,0.4] b [2,0]
#   sums a [3,2,-6,1.4] b [0,0] -> signs a [+,+,-,+]; b zero -> global majority sign(+1+1-1+1) = +
# per_tensor: "a" (d = 4, 2nd smallest) trims exactly as above; "b" (d = 2, 1st smallest) keeps all:
#   sums b [0,-0.35] -> signs [0,-]; tensor majority -1 -> b signs [-,-]
EXPECTED = {
    ("global", "sum"): {"a": [5.0, 3.0, -6.0, 2.4], "b": [3.0, 0.0]},
    ("global", "mean"): {"a": [2.5, 3.0, -6.0, 1.2], "b": [1.5, 0.0]},
    ("global", "max"): {"a": [4.0, 3.0, -6.0, 2.0], "b": [2.0, 0.0]},
    ("per_tensor", "sum"): {"a": [5.0, 3.0, -6.0, 2.4], "b": [-3.0, -0.5]},
    ("per_tensor", "mean"): {"a": [2.5, 3.0, -6.0, 1.2], "b": [-3.0, -0.5]},
    ("per_tensor", "max"): {"a": [4.0, 3.0, -6.0, 2.0], "b": [-3.0, -0.5]},
}


@pytest.mark.parametrize("scope,merge", sorted(EXPECTED))
def test_every_variant_closed_form(scope, merge):
    out = ties_merge(TVS, density=0.5, scope=scope, merge=merge)
    for k, v in EXPECTED[(scope, merge)].items():
        assert torch.allclose(out[k], T(v)), (scope, merge, k, out[k])


def test_trim_global_keeps_fusionbench_count_and_ties():
    tr = trim(TVS[0], 0.5, "global")
    assert torch.equal(tr["a"], T([4.0, -1.0, 0.0, 2.0])) and torch.equal(tr["b"], T([-3.0, 0.0]))
    # floor(0.5*6) + 1 = 4 entries survive with distinct magnitudes (FusionBench's off-by-one)
    assert sum(int((v != 0).sum()) for v in tr.values()) == 4
    tr2 = trim(TVS[1], 0.5, "global")  # threshold |1|, held by two entries: both kept
    assert torch.equal(tr2["a"], T([-2.0, 3.0, 0.0, -1.0])) and torch.equal(tr2["b"], T([1.0, 0.0]))
    tied = trim({"x": T([1.0, -1.0, 1.0, 2.0])}, 0.5, "per_tensor")  # 2nd smallest |.| = 1 ties 3 entries
    assert torch.equal(tied["x"], T([1.0, -1.0, 1.0, 2.0]))


def test_kth_threshold_edges():
    m = T([0.1, 0.5, 1.0, 2.0, 3.0])
    assert float(kth_threshold(m, 1.0)) == 0.0  # density 1 keeps everything
    assert float(kth_threshold(m, 0.1)) == 3.0  # floor(0.5) = 0 kept -> only the largest survives
    assert float(kth_threshold(m, 0.4)) == 1.0  # 5 - 2 = 3rd smallest


def test_zero_majority_global_vs_per_tensor():
    tvs = [{"x": T([1.0, -1.0])}, {"x": T([-1.0, 1.0])}]
    # sums are 0 everywhere: global majority sign(0) = 0 stays 0 -> negative entries selected (FusionBench)
    assert torch.equal(elect_signs(tvs, "global")["x"], T([0.0, 0.0]))
    assert torch.equal(ties_merge(tvs, 1.0, "global", "sum")["x"], T([-1.0, -1.0]))
    # per tensor (peft): a zero majority counts as +1 -> positive entries selected
    assert torch.equal(ties_merge(tvs, 1.0, "per_tensor", "sum")["x"], T([1.0, 1.0]))


def _pre():
    return {"a": torch.zeros(4), "b": torch.ones(2)}


def _tasks(tvs):
    pre = _pre()
    return [TaskInput(f"t{i}", i, {k: pre[k] + v[k] for k in pre}, None, None) for i, v in enumerate(tvs)]


def test_joint_is_scaled_ties_and_default_scaling():
    m = Ties(TiesConfig(density=0.5), CTX, protocol="joint")
    assert m.scaling == 0.3
    assert Ties(TiesConfig(), CTX, protocol="continual").scaling == 0.5
    assert Ties(TiesConfig(scaling=0.7), CTX, protocol="joint").scaling == 0.7
    state = m.joint(_pre(), _tasks(TVS))
    assert state.step == 3
    for k, v in EXPECTED[("global", "sum")].items():
        assert torch.allclose(state.merged[k], 0.3 * T(v))


def test_continual_fusionbench_recurrence_closed_form():
    pre = {"x": torch.zeros(2)}
    tasks = [
        TaskInput("t0", 0, {"x": T([2.0, -4.0])}, None, None),
        TaskInput("t1", 1, {"x": T([-1.0, 3.0])}, None, None),
    ]
    m = Ties(TiesConfig(scaling=0.5, density=1.0), CTX, protocol="continual")
    s1 = m.step(m.init(pre), tasks[0], pre)
    assert torch.equal(s1.merged["x"], T([1.0, -2.0]))  # step 1: λ·τ_1, untrimmed
    s2 = m.step(s1, tasks[1], pre)
    # TIES([[1,-2],[-1,3]]): sums [0,1] -> signs [0->+ (majority), +] -> picks [1, 3]
    assert torch.equal(s2.merged["x"], T([1.5, -0.5]))
    assert torch.equal(s1.merged["x"], T([1.0, -2.0]))  # the earlier state was not modified


def test_first_step_is_untrimmed_even_at_low_density():
    m = Ties(TiesConfig(density=0.2), CTX, protocol="continual")
    s = m.step(m.init(_pre()), _tasks(TVS)[0], _pre())
    assert torch.allclose(s.merged["a"], 0.5 * TVS[0]["a"]) and torch.allclose(
        s.merged["b"], 0.5 * TVS[0]["b"]
    )


@pytest.mark.parametrize(
    "key,value",
    [("density", 0.0), ("density", 1.5), ("topk_scope", "layer"), ("merge", "median"), ("scaling", -0.1)],
)
def test_validate_rejects_bad_values(key, value):
    cfg = OmegaConf.structured(TiesConfig)
    cfg[key] = value
    with pytest.raises(UserError, match=key):
        validate_method(Ties, cfg)
