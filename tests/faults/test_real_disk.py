"""Fault injection on a real full disk (issue 39 item 8): a small tmpfs mounted in a private mount
namespace (``unshare -rm``, no root needed where the kernel allows user namespaces) holds a completed
run; the disk is then filled and the same out_dir rerun with another seed. The rerun must end in one
``error:`` line (exit 2, no traceback), leave the earlier result's bytes as they were and leave no
stray file (a half-written name, a probe) in the run dir. Skipped, saying why, where the machine
cannot mount a tmpfs this way (a container without user namespaces)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from faults.conftest import RUN, lines, one_error
from otmf_exp.runtime.results import WRITTEN

SCRIPT = r"""
set -u
D=$1; T=$2; PY=$3; LEAVE_KB=$4; shift 4
mount -t tmpfs -o size=8m tmpfs "$D" || exit 97
"$PY" -m otmf_exp.run "$@" out_dir="$D/run" > "$T/first.out" 2> "$T/first.err" || exit 98
cp "$D/run/metrics.json" "$T/metrics_before.json"
free=$(df -k --output=avail "$D" | tail -1)
head -c $(( (free - LEAVE_KB) * 1024 )) /dev/zero > "$D/fill"
"$PY" -m otmf_exp.run "$@" seed=1 out_dir="$D/run" > "$T/second.out" 2> "$T/second.err"
echo $? > "$T/second.rc"
cp "$D/run/metrics.json" "$T/metrics_after.json" 2>/dev/null
ls -A "$D/run" > "$T/listing"
"""


def _can_mount(tmp_path: Path) -> str | None:
    if shutil.which("unshare") is None:
        return "no unshare(1) on this machine"
    probe = tmp_path / "probe"
    probe.mkdir()
    r = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {probe}"],
        capture_output=True,
        text=True,
    )
    return None if r.returncode == 0 else f"cannot mount a tmpfs in a user namespace: {r.stderr.strip()}"


@pytest.mark.full
@pytest.mark.parametrize(
    ("leave_kb", "expect"),
    [
        (0, "is not writable (No space left on device); free space on its disk"),  # the up-front probe
        (64, "No space left on device"),  # a write in the middle of the run (a checkpoint)
    ],
)
def test_a_full_disk_is_one_line_and_the_earlier_result_is_kept(tmp_path: Path, leave_kb: int, expect: str):
    why = _can_mount(tmp_path)
    if why:
        pytest.skip(why)
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    cmd = [
        "unshare",
        "-rm",
        "sh",
        "-c",
        SCRIPT,
        "sh",
        str(mnt),
        str(out),
        sys.executable,
        str(leave_kb),
        *RUN,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:], (out / "first.err").read_text()[-2000:])
    rc = int((out / "second.rc").read_text())
    one_error(lines((out / "second.err").read_text()), 2, rc, expect)
    assert (out / "metrics_after.json").read_bytes() == (out / "metrics_before.json").read_bytes()
    names = set((out / "listing").read_text().split())
    stray = names - set(WRITTEN)
    assert not stray, stray
