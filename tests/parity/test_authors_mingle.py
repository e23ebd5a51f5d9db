"""The MINGLE rows of ``make parity-authors`` (continual LoRA-WEMoE, ``mingle``): our side records exactly
what the reference is fed (router/gate seeds, seed samples, batches), without the clone; and, with the
clone (``MINGLE_REPO``) and ``.venv-parity`` (marker ``parity``), a perturbed row fails and exits 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from otmf_exp.parity import authors_mingle as am
from otmf_exp.parity.reference.authors_mingle import sign_fixed

ROOT = Path(__file__).resolve().parents[2]
PY = ROOT / ".venv-parity" / "bin" / "python"
CASES = {c.name: c for c in am.CASES}


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory) -> Path:
    from otmf_exp.offline.zoo import DigitsZoo

    return DigitsZoo(progress=False).export(tmp_path_factory.mktemp("zoo"), force=True)


def _run(name: str, zoo_dir: Path, tmp_path: Path) -> tuple[dict, dict]:
    work = tmp_path / name
    work.mkdir()
    out = CASES[name].ours(zoo_dir, work)
    return out, torch.load(work / "case.pt", weights_only=True)


def _served_match(out: dict, case: dict) -> None:
    for t in am.TASKS:
        got = [out[k] for k in sorted(k for k in out if k.startswith(f"batch/{t}/"))]
        assert len(got) == len(case["served"][t]) and all(
            torch.equal(a, b) for a, b in zip(got, case["served"][t])
        )
        pool = {tuple(x.flatten().tolist()) for x in case["seeds"][t]}
        assert all(
            tuple(x.flatten().tolist()) in pool for b in got for x in b
        )  # batches are of the seed samples


def test_wemoe_our_side_records_the_router_seeds_seed_samples_and_batches(zoo_dir, tmp_path):
    out, case = _run("wemoe_continual_mingle", zoo_dir, tmp_path)
    assert case["steps"] == am.WEMOE_STEPS and len(case["blocks"]) == 2
    _served_match(out, case)
    assert all(len(case["served"][t]) == am.WEMOE_STEPS for t in am.TASKS)
    for step in (1, 2, 3):
        for blk, seed in zip(case["blocks"], case["router_seeds"][step - 1], strict=True):
            w, b = out[f"init/{step}/{blk}/router.w"], out[f"init/{step}/{blk}/router.b"]
            assert w.shape[0] == step and b[-1] == pytest.approx(
                0.3
            )  # one new row per task, bias init_lambda
            row = 0.01 * torch.randn(1, w.shape[1], generator=torch.Generator().manual_seed(seed))
            assert torch.equal(w[-1:], row)  # the seed written is the one the new row was drawn with
            if step > 1:
                assert torch.equal(w[:-1], out[f"router/{step - 1}/{blk}/router.w"])  # old rows carried over
            assert not torch.equal(out[f"router/{step}/{blk}/router.w"], w)  # adapted
    assert {k.split("/")[-1] for k in out if k.startswith("expert/")} == {"0", "1", "2"}
    assert set(case["keys"]) == {k[len("weights/1/") :] for k in out if k.startswith("weights/1/")}
    assert not any(".mlp." in k for k in case["keys"])


def test_mingle_our_side_records_the_gate_seeds_and_the_adaptation_and_covariance_batches(zoo_dir, tmp_path):
    out, case = _run("mingle_mingle", zoo_dir, tmp_path)
    _served_match(out, case)
    per_epoch = -(-len(case["seeds"]["rot90"]) // 16)
    assert all(len(case["served"][t]) == am.MINGLE_STEPS + per_epoch for t in am.TASKS)  # TTA, then one pass
    for step in (1, 2, 3):
        g = torch.Generator().manual_seed(case["gate_seeds"][step - 1])
        for site in case["sites"]:  # one generator per step, drawn in site order
            w = out[f"init/{step}/{site}/w"]
            assert torch.equal(w, 0.01 * torch.randn(1, w.shape[1], generator=g))
            assert float(out[f"init/{step}/{site}/b"]) == 0.0
            gate = out[f"gate/{step}/{site}/w"]
            assert gate.shape[0] == step and not torch.equal(gate[-1:], w)
            assert out[f"subspace/{step}/{site}"].shape[1] == min(3 * step, w.shape[1])
    assert len(case["sites"]) == 12  # q, k, v, out_proj, fc1, fc2 of both layers


def test_the_wemoe_routing_row_redraws_the_routers_and_routes_per_batch_and_per_sample(zoo_dir, tmp_path):
    from safetensors.torch import load_file

    from otmf_exp.parity import wemoe as pw

    case = next(c for c in pw.CASES if c.name == "wemoe_routing")
    out = case.ours(zoo_dir, tmp_path)
    saved = load_file(str(tmp_path / "wemoe_routing.safetensors"))
    assert set(saved) == {k for k in out if k.startswith("router/")}
    assert {k.split("/")[1] for k in saved} == {"d0", "d1", "d2"}
    assert all(float(v.std()) > 0.05 for v in saved.values() if v.numel() > 1)  # order 1, not the init's 0.01
    for depth in (0, 1, 2):
        for t in pw.TASKS:
            a, b = out[f"logits/d{depth}_br1/{t}"], out[f"logits/d{depth}_br0/{t}"]
            assert (depth == 0) == torch.allclose(a, b)  # depth 0 routes alike for every sample


def test_sign_fixed_is_blind_to_column_signs_only():
    u = torch.linalg.qr(torch.randn(8, 3, generator=torch.Generator().manual_seed(0)))[0]
    flipped = u * torch.tensor([-1.0, 1.0, -1.0])
    assert torch.equal(sign_fixed(u), sign_fixed(flipped))
    assert (sign_fixed(u).abs().argmax(0) == u.abs().argmax(0)).all()
    assert not torch.equal(sign_fixed(u), sign_fixed(u.flip(1)))


def _driver(tmp_path: Path, cases: str, perturb: str | None) -> subprocess.CompletedProcess:
    assert PY.exists(), "no .venv-parity: run `make parity-test` (it creates the FusionBench venv)"
    assert os.environ.get("MINGLE_REPO"), "MINGLE_REPO=DIR (a clone of github.com/zihuanqiu/MINGLE) is needed"
    env = {k: v for k, v in os.environ.items() if k != "OTMF_PARITY_PERTURB"}
    env.setdefault("OTMF_REPO", str(tmp_path))  # the driver checks both; these rows read only MINGLE_REPO
    if perturb:
        env["OTMF_PARITY_PERTURB"] = perturb
    cmd = [sys.executable, "-m", "otmf_exp.parity", "--authors", "--python", str(PY), "--cases", cases]
    cmd += ["--work", str(tmp_path / "work"), "--json", str(tmp_path / "p.json")]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=900)


@pytest.mark.authors  # needs MINGLE_REPO: make parity-authors-test, not CI
def test_the_mingle_rows_pass_and_a_perturbed_one_fails_with_exit_1(tmp_path):
    rows = "wemoe_continual_mingle,mingle_mingle"
    clean = _driver(tmp_path, rows, None)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "FAIL" not in clean.stdout
    for row in rows.split(","):
        bad = _driver(tmp_path, row, f"{row}:1.0001")
        assert bad.returncode == 1, bad.stdout + bad.stderr
        assert f"FAIL {row}: max |Δ|" in bad.stdout
