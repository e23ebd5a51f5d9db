"""Every registered method, picked up from the registry: CLI run, each protocol it supports, resume.

Nothing here lists methods by hand: a new entry in ``merging.METHODS`` is tested by these
checks automatically. ``FAST`` only shortens methods that train (an unknown method runs with its
own defaults).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from _timing import untimed, untimed_steps

from otmf_exp.merging import METHODS
from otmf_exp.runtime import checkpoint

ORDER = "task_order=[rot90,flip,invert]"
FAST = {
    "adamerging": ["method.steps=3"],
    "dop": ["method.steps=3"],
    "concrete": ["method.max_steps=3", "method.max_adamerging_steps=3"],
    "otmf": ["method.iterations=4", "method.head_tuning.steps=2"],
    "mingle": ["method.max_steps=3"],
    "continual_finetune": ["method.steps=3"],
    "wemoe": ["method.max_steps=3"],
}
CASES = [(name, p) for name, cls in sorted(METHODS.items()) for p in cls.protocols]
CONTINUAL = sorted(n for n, cls in METHODS.items() if "continual" in cls.protocols)
_untimed, _steps = untimed, untimed_steps


@pytest.mark.parametrize("method,protocol", CASES)
def test_runs_end_to_end_in_each_protocol(run_cfg, method, protocol):
    m, out = run_cfg(f"method={method}", f"protocol={protocol}", ORDER, *FAST.get(method, []))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["method"] == method and saved["protocol"] == protocol == m["protocol"]
    assert math.isfinite(saved["acc"]) and 0.0 <= saved["acc"] <= 100.0
    assert saved["state_growth"] == METHODS[method].state_growth
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == (3 if protocol == "continual" else 1)
    assert all(s["state_mb"] > 0 for s in steps)


def test_unsupported_protocols_are_refused(run_cfg):
    from otmf_exp.errors import UserError

    refused = [(n, p) for n, cls in METHODS.items() for p in ("continual", "joint") if p not in cls.protocols]
    for name, protocol in refused:
        with pytest.raises(UserError, match=protocol):
            run_cfg(f"method={name}", f"protocol={protocol}", ORDER)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_cli_run(tmp_path, zoo, method):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "otmf_exp.run",
        f"method={method}",
        f"protocol={'continual' if 'continual' in METHODS[method].protocols else 'joint'}",
        "task_order=[rot90,flip]",
        f"out_dir={out}",
        "progress=false",
        *FAST.get(method, []),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "metrics.json").read_text())["method"] == method
    assert "ACC" in r.stdout  # the console summary


class _Interrupted(Exception):
    pass


@pytest.mark.parametrize("method", CONTINUAL)
def test_interrupted_then_resumed_equals_uninterrupted(run_cfg, monkeypatch, method):
    args = (f"method={method}", ORDER, *FAST.get(method, []))
    full, out = run_cfg(*args)
    full_steps = _steps(out)
    (out / "metrics.json").unlink()
    real_save = checkpoint.save

    def save_then_die(out_dir, step, *a, **k):  # the process dies right after step 1's checkpoint
        real_save(out_dir, step, *a, **k)
        if step == 1:
            raise _Interrupted

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(_Interrupted):
        run_cfg(*args)
    monkeypatch.setattr(checkpoint, "save", real_save)
    assert not (out / "metrics.json").exists()
    resumed, out = run_cfg(*args, "resume=true")
    assert _untimed(resumed) == _untimed(full)
    assert _steps(out) == full_steps
