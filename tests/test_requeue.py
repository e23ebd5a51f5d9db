"""SLURM requeue through hydra-submitit-launcher, run with its local executor (``submitit_local``):
a job preempted after its first checkpoint is requeued by submitit, resumes from that checkpoint
and ends with the metrics of an uninterrupted run; metrics.json records the requeue."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_every_method import ORDER, _steps, _untimed

# loaded by every Python process of the sweep (PYTHONPATH): inside a submitit job, the first
# attempt signals itself with SIGUSR2 (submitit's timeout/preemption signal) right after step 1's checkpoint
PREEMPT = """
import os
if os.environ.get("SUBMITIT_EXECUTOR") and os.environ.get("PREEMPT_MARK"):
    import signal
    from otmf_exp.runtime import checkpoint

    _save = checkpoint.save

    def save(out_dir, step, *a, **k):
        _save(out_dir, step, *a, **k)
        if step == 1 and not os.path.exists(os.environ["PREEMPT_MARK"]):
            open(os.environ["PREEMPT_MARK"], "w").close()
            os.kill(os.getpid(), signal.SIGUSR2)

    checkpoint.save = save
"""


def test_preempted_job_is_requeued_and_resumes(run_cfg, tmp_path: Path) -> None:
    args = ["method=task_arithmetic", ORDER]
    full, out = run_cfg(*args)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(PREEMPT)
    mark, root = tmp_path / "preempted", tmp_path / "sweep"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
        "PREEMPT_MARK": str(mark),
    }
    cmd = [sys.executable, "-m", "otmf_exp.run", "-m", *args, "seed=0", "progress=false",
           "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", f"hydra.sweep.dir={root}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert mark.exists()  # the job really was preempted once
    logs = "".join(p.read_text() for p in (root / ".submitit").rglob("*_log.*"))
    # a short timeout_min: submitit reads any signal as a timeout, counted against max_num_timeout
    assert "this job is timed-out" in logs and "Requeued job" in logs
    (job,) = (m.parent for m in root.glob("*/metrics.json"))  # the sweep's one job dir
    saved = json.loads((job / "metrics.json").read_text())
    assert saved["requeued"]["resumed"] is True and saved["requeued"]["job_id"]
    assert "resuming from its checkpoint" in logs
    saved.pop("requeued")
    assert _untimed({k: v for k, v in saved.items() if k != "provenance"}) == _untimed(
        {k: v for k, v in json.loads((out / "metrics.json").read_text()).items() if k != "provenance"}
    )
    assert _steps(job) == _steps(out)
    assert full["acc"] == saved["acc"]
