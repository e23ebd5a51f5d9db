"""Baseline variants and method-specific records end to end on digits8 (every method in every protocol
it supports is covered generically by test_every_method.py)."""

import json
import math

import pytest

from otmf_exp.errors import UserError

ORDER = "task_order=[rot90,flip,invert]"


CASES = [
    ("ties", "continual", ["method.topk_scope=per_tensor", "method.merge=mean"]),
    ("opcm", "continual", []),
    ("opcm", "continual", ["method.fusionbench_compat=true"]),
    ("adamerging", "joint", ["method.steps=3"]),
    ("adamerging", "continual", ["method.steps=3", "method.granularity=layer"]),
]


@pytest.mark.parametrize("method,protocol,extra", CASES)
def test_runs_end_to_end(run_cfg, method, protocol, extra):
    metrics, out = run_cfg(f"method={method}", f"protocol={protocol}", ORDER, *extra)
    assert (out / "metrics.json").exists()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["method"] == method and saved["protocol"] == protocol
    assert math.isfinite(saved["acc"]) and 0.0 <= saved["acc"] <= 100.0
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == (3 if protocol == "continual" else 1)
    if method == "adamerging":
        assert steps[-1]["entropy_curve"] and len(steps[-1]["entropy_curve"]) == 3
    if method == "opcm":
        assert steps[-1]["opcm_lambda"] > 0


def test_opcm_rejects_joint(run_cfg):
    with pytest.raises(UserError, match="continual"):
        run_cfg("method=opcm", "protocol=joint", ORDER)


def test_alpha_sets_main_coefficient(make_cfg):
    from otmf_exp.config import method_config

    assert method_config(make_cfg("method=ties", "alpha=0.7")).scaling == 0.7
    assert method_config(make_cfg("method=magmax", "alpha=0.2")).scaling == 0.2
    assert method_config(make_cfg("method=opcm", "alpha=0.9")).alpha == 0.9
    with pytest.raises(UserError, match="alpha"):
        method_config(make_cfg("method=adamerging", "alpha=0.5"))


@pytest.mark.parametrize("override", ["method.density=0", "method.merge=median", "method.alpha=-1"])
def test_bad_values_fail_before_work(make_cfg, override):
    from otmf_exp.config import method_config

    method = {"method.density=0": "ties", "method.merge=median": "ties", "method.alpha=-1": "opcm"}[override]
    with pytest.raises(UserError):
        method_config(make_cfg(f"method={method}", override))
