"""OTMF's rows against the authors' ``compute_sr_mask`` (``otmf_exp.parity.authors_otmf``).

Without the clone: our side's recording (the batches, masks, losses and selection each fusion step
used, in the layout both sides share), the float64 compute path it needs (float32 unchanged, bit for
bit) and the reference side's message when ``OTMF_REPO`` is missing. With the clone (marker
``authors``, ``make parity-authors-test OTMF_REPO=DIR``): a row passes, the same row perturbed fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from otmf_exp.merging.otmf.ot_fusion import FusionStep
from otmf_exp.merging.otmf.ot_masks import Masks, compute_dtype, masked_merge

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def zoo_dir(zoo, tmp_path_factory):
    return zoo.export(tmp_path_factory.mktemp("otmf_zoo") / "zoo", force=True)


def test_masks_and_the_student_compute_in_float64_only_for_float64_models():
    like = {k: torch.randn(3, 2, dtype=d) for k, d in (("a", torch.float32), ("b", torch.bfloat16))}
    like["c"] = torch.randn(3, 2, dtype=torch.float64)
    m = Masks(like, "identity", "element")
    assert [m.raw[k].dtype for k in "abc"] == [torch.float32, torch.float32, torch.float64]
    assert compute_dtype(like["b"]) == torch.float32 and compute_dtype(like["c"]) == torch.float64
    assert m.at_init()
    with torch.no_grad():
        m.raw["c"][0, 0] += 1e-12  # a change float32 could not hold
    assert not m.at_init()
    m.reset()
    assert m.at_init()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_student_weight_float32_is_the_previous_expression_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    p, tv_prev, tv_new = (torch.randn(64, 32, generator=g).to(dtype) for _ in range(3))
    like = {"w": p}
    m_pre, m_post = Masks(like, "identity", "element"), Masks(like, "identity", "element")
    with torch.no_grad():
        m_pre.raw["w"].add_(0.1 * torch.randn(64, 32, generator=g, dtype=m_pre.raw["w"].dtype))
        m_post.raw["w"].add_(0.1 * torch.randn(64, 32, generator=g, dtype=m_post.raw["w"].dtype))
    step = types.SimpleNamespace(
        pretrained=like, tv_prev={"w": tv_prev}, tv_new={"w": tv_new}, m_pre=m_pre, m_post=m_post,
        cfg=types.SimpleNamespace(alpha=0.8),
    )  # fmt: skip
    got = FusionStep.weight(step, "w", (False, False))
    mp, mq = m_pre.value("w", False), m_post.value("w", False)
    # the expression before compute_dtype (every operand through .float())
    before = torch.addcmul(
        torch.addcmul(p.float(), mp.float(), tv_prev.float(), value=0.8),
        mq.float(),
        tv_new.float(),
        value=1.0 - 0.8,
    ).to(dtype)
    assert got.dtype == dtype
    if dtype == torch.float64:
        exact = torch.addcmul(torch.addcmul(p, mp, tv_prev, value=0.8), mq, tv_new, value=1.0 - 0.8)
        assert torch.equal(got, exact) and not torch.equal(got, before)  # not rounded through float32
    else:
        assert torch.equal(got, before)


def test_our_side_records_the_batches_masks_and_losses_each_fusion_step_used(zoo_dir):
    from otmf_exp.parity.authors_otmf import run
    from otmf_exp.parity.ours import task_weights, zoo_tasks
    from otmf_exp.parity.reference.authors_otmf import named

    r = run(zoo_dir, n_tasks=3, iterations=5)
    assert sorted(r["fused"]) == [2, 3] and r["order"] == zoo_tasks(zoo_dir)[:3]
    for t in (2, 3):
        assert [len(r["plans"][t][s]) for s in ("pre", "post")] == [3, 2]  # alternate: even = pre
        for s in ("pre", "post"):  # the training loop saw the teachers' batches (what theirs is fed)
            got, fed = r["consumed"][t][s], r["plans"][t][s]
            assert len(got) == len(fed) and all(torch.equal(a, b) for a, b in zip(got, fed))
        f = r["fused"][t]
        assert len(f["losses"]) == 5 and f["selected"] == min(range(5), key=f["losses"].__getitem__)
        assert set(f["masks"]["pre"]) == set(r["keys"]) == set(r["weights"][t])
    # the pre batches of step 3 are task 2's pool (previous_task), not step 2's post batches (a new stream)
    assert not torch.equal(r["plans"][3]["pre"][0], r["plans"][2]["post"][0])
    # step 2's merged weights are θ₀ + α M_pre⊙τ_1 + (1−α) M_post⊙τ_2 with the recorded masks
    order, keys = r["order"], r["keys"]
    from otmf_exp.parity.ours import backbone

    pre = backbone(zoo_dir).pretrained_state()
    tv = [{k: v - pre[k] for k, v in task_weights(zoo_dir, n, keys).items()} for n in order[:2]]
    m = r["fused"][2]["masks"]
    merged = masked_merge(tv[0], tv[1], m["pre"], m["post"], 0.8)
    assert all(torch.equal(r["weights"][2][k], pre[k] + merged[k]) for k in keys)
    out = {p: named(r, p) for p in ("weights", "masks", "all")}
    assert set(out["weights"]) | set(out["masks"]) == set(out["all"])
    assert not set(out["weights"]) & set(out["masks"])
    assert out["masks"]["select/2"].item() == r["fused"][2]["selected"]  # theirs: first lowest loss
    assert torch.equal(out["weights"]["batch/3/pre/002"], r["consumed"][3]["pre"][2])


def test_our_side_runs_in_float64(zoo_dir):
    from otmf_exp.parity.authors_otmf import run

    r = run(zoo_dir, dtype="float64", n_tasks=2, iterations=2)
    f = r["fused"][2]
    assert all(v.dtype == torch.float64 for s in ("pre", "post") for v in f["masks"][s].values())
    assert all(v.dtype == torch.float64 for v in r["weights"][2].values())
    assert any(bool((v != 1).any()) for v in f["masks"]["pre"].values())  # trained
    assert all(torch.isfinite(torch.tensor(f["losses"])))


def test_the_reference_side_without_the_clone_says_what_is_missing(monkeypatch, tmp_path):
    from otmf_exp.parity.reference import authors_otmf as ref

    monkeypatch.delenv("OTMF_REPO", raising=False)
    (tmp_path / "case.pt").write_bytes(b"")
    with pytest.raises(RuntimeError, match="OTMF_REPO is not set"):
        ref.otmf_sr(tmp_path, tmp_path)


@pytest.mark.authors
def test_the_otmf_row_passes_and_fails_when_perturbed(tmp_path):
    """Needs ``.venv-parity`` (with the OTMF scripts' imports) and ``OTMF_REPO``, a clone of
    https://github.com/37ETs/OT_fusion: ``make parity-authors-test OTMF_REPO=DIR``."""
    repo = os.environ.get("OTMF_REPO")
    assert repo and Path(repo, "src/tasks/shortest_route_mask.py").is_file(), (
        "set OTMF_REPO to a clone of https://github.com/37ETs/OT_fusion (git clone "
        "https://github.com/37ETs/OT_fusion): this test runs the authors' compute_sr_mask"
    )
    py = ROOT / ".venv-parity" / "bin" / "python"
    assert py.exists(), "no .venv-parity: run `make parity-authors` once (it creates and completes it)"
    # --authors checks that both clones are directories; these rows read OTMF_REPO only
    env = {**os.environ, "OTMF_PARITY_PERTURB": "otmf_authors:1.0001"}
    env.setdefault("MINGLE_REPO", repo)
    cmd = [sys.executable, "-m", "otmf_exp.parity", "--authors", "--python", str(py)]
    cmd += ["--cases", "otmf_authors,otmf_authors_masks", "--work", str(tmp_path / "work")]
    bad = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "FAIL otmf_authors: max |Δ|" in bad.stdout  # the perturbed row
    assert "FAIL otmf_authors_masks" not in bad.stdout  # the same run's unperturbed row passes
