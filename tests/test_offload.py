"""method.offload: the masks' Adam moments and best-mask copies wait off the device (a
temporary file on the CPU, host memory on CUDA), one group's on the device at a time, and the
results equal those of the resident optimiser bit for bit."""

from __future__ import annotations

import errno
import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from otmf_exp.errors import UserError
from otmf_exp.merging.otmf.ot_masks import BackwardAdam, adam
from otmf_exp.runtime.offload import OffloadedMoments

ARGS = (
    "task_order=[rot90,flip,invert]",
    "method.iterations=5",
    "method.head_tuning.steps=2",
    "save_merged=true",
)


def _steps(out) -> list[dict]:
    return [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("store", ["file", "host"])
def test_moments_round_trip_bitwise_against_one_resident_adam(tmp_path, store):
    """Two groups of tensors, stepped alternately with random gradients: the offloaded moments give
    the parameters of one resident fused Adam per group, bit for bit; none stays on the device."""
    g = torch.Generator().manual_seed(0)
    shapes = [[(7, 5), (5,)], [(3, 4, 2)]]
    ours = [[torch.ones(s, requires_grad=True) for s in group] for group in shapes]
    ref = [[torch.ones(s, requires_grad=True) for s in group] for group in shapes]
    opts, ref_opts = [adam(gr, 1e-2) for gr in ours], [adam(gr, 1e-2) for gr in ref]
    with OffloadedMoments(ours, torch.device("cpu"), str(tmp_path), store=store) as off:
        assert off.bytes == 2 * 4 * (35 + 5 + 24)
        for it in range(6):
            i = it % 2
            for p, q in zip(ours[i], ref[i]):
                p.grad = torch.randn(p.shape, generator=g)
                q.grad = p.grad.clone()
            off.load(i, opts[i])
            opts[i].step()
            off.store(i, opts[i])
            ref_opts[i].step()
            for o in opts:
                assert all("exp_avg" not in st for st in o.state.values())  # only while a group steps
    for gr, rg in zip(ours, ref):
        for p, q in zip(gr, rg):
            assert torch.equal(p, q)
    assert list(tmp_path.iterdir()) == []  # an anonymous file: nothing left behind


@pytest.mark.parametrize(
    ("schedule", "best_masks"), [("alternate", "on_write"), ("joint", "on_write"), ("alternate", "copy")]
)
def test_offloaded_step_equals_the_resident_step_bitwise(
    run_cfg, monkeypatch, tmp_path, schedule, best_masks
):
    """End to end: merged weights, curves, selection and accuracies equal, bit for bit; the step
    records the store's size and I/O time; after every group step no moments are on the device."""
    resident: list[int] = []
    real_step = BackwardAdam._step

    def counting_step(self, i):
        real_step(self, i)
        resident.append(sum("exp_avg" in st for o in self.opts for st in o.state.values()))

    monkeypatch.setattr(BackwardAdam, "_step", counting_step)
    args = (*ARGS, f"method.schedule={schedule}")
    metrics_a, out = run_cfg(*args, "method.offload=false")
    wa, sa = load_file(str(out / "merged.safetensors")), _steps(out)
    steps_done = len(resident)
    off = tmp_path / "offload"
    off.mkdir()
    # best_masks=copy (a copy refreshed on every improvement) is bit-identical to on_write by design
    metrics_b, out = run_cfg(
        *args, "method.offload=true", f"method.offload_dir={off}", f"method.best_masks={best_masks}"
    )
    wb, sb = load_file(str(out / "merged.safetensors")), _steps(out)
    assert len(resident) > steps_done and not any(resident[steps_done:])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert metrics_a["acc_matrix"] == metrics_b["acc_matrix"]
    for key in ("ot_loss_pre", "ot_loss_post", "select_iteration", "select_loss", "mask_quantiles"):
        assert [s.get(key) for s in sa] == [s.get(key) for s in sb], key
    fused = [s for s in sb if s.get("ot_loss_pre")]
    assert fused and all(s["offload_mb"] > 0 and s["time_offload_s"] >= 0 for s in fused)
    assert all("offload_mb" not in s for s in sa)
    assert all(s.get("select_replayed_iterations", 0) == 0 for s in sb)  # the best copies are off the device
    assert list(off.iterdir()) == []


def test_offload_dir_that_is_not_a_directory_is_one_line(run_cfg, tmp_path):
    with pytest.raises(
        UserError, match="method.offload_dir=.*nope does not exist; give an existing directory"
    ):
        run_cfg(*ARGS, "method.offload=true", f"method.offload_dir={tmp_path / 'nope'}")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="method.offload_dir=.*file is a file; give an existing directory"):
        run_cfg(*ARGS, "method.offload=true", f"method.offload_dir={tmp_path / 'file'}")


def test_a_full_disk_is_one_line_before_any_step(tmp_path, monkeypatch):
    import otmf_exp.runtime.offload as mod

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mod.os, "posix_fallocate", full)
    with pytest.raises(UserError, match=r"no room for the Adam moments .* in .*; free space"):
        OffloadedMoments([[torch.ones(10, requires_grad=True)]], torch.device("cpu"), str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_a_directory_in_ram_is_warned_about(tmp_path, monkeypatch, caplog):
    import otmf_exp.runtime.offload as mod

    monkeypatch.setattr(mod, "_filesystem", lambda d: "tmpfs")
    with caplog.at_level(logging.WARNING, logger=mod.__name__):
        OffloadedMoments([[torch.ones(10, requires_grad=True)]], torch.device("cpu"), str(tmp_path)).close()
    assert "the Adam moments stay in memory" in caplog.text


def test_filesystem_is_read_off_the_longest_mount_point(tmp_path, monkeypatch):
    import otmf_exp.runtime.offload as mod

    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/vda / ext4 rw 0 0\ntmpfs {tmp_path} tmpfs rw 0 0\n")
    real = mod.Path

    monkeypatch.setattr(mod, "Path", lambda p: real(mounts) if p == "/proc/mounts" else real(p))
    assert mod._filesystem(tmp_path / "x") == "tmpfs"
    assert mod._filesystem(real("/usr")) == "ext4"


def test_offload_and_offload_dir_are_not_part_of_a_runs_identity():
    """Offloading changes no bit (the tests above) and where the moments wait changes no number, so both
    are declared ``neutral`` on the schema: a resume from another node's $TMPDIR, or with offload
    toggled, is the same run, and tables do not split rows by them."""
    from otmf_exp.reporting.runs import result_keys
    from otmf_exp.runtime.resume import config_hash, result_config

    a = result_config({"seed": 0}, {"name": "otmf", "offload": True, "offload_dir": "/scratch/a"})
    b = result_config({"seed": 0}, {"name": "otmf", "offload": True, "offload_dir": "/tmp"})
    c = result_config({"seed": 0}, {"name": "otmf", "offload": False, "offload_dir": "/tmp"})
    d = result_config({"seed": 0}, {"name": "otmf", "offload": False, "select": "last"})
    assert config_hash(a) == config_hash(b) == config_hash(c) != config_hash(d)
    assert result_keys(["method.offload_dir", "method.offload", "method.select"]) == ["method.select"]


def test_spilled_copy_round_trips_and_on_write_never_replays(tmp_path):
    """With both sides' copies off the device, on_write holds both instead of falling back to
    replay (the sequence that replays in test_otmf_speed), and finish() restores the exact best."""
    from otmf_exp.merging.otmf.ot_masks import BestOnWrite, Masks
    from otmf_exp.runtime.offload import SpilledCopy

    sides = {
        s: Masks({"w": torch.ones(3), "b": torch.ones(2)}, "identity", "element") for s in ("pre", "post")
    }
    with (
        SpilledCopy(sides["pre"].raw, "cpu", str(tmp_path)) as a,
        SpilledCopy(sides["post"].raw, "cpu", str(tmp_path)) as b,
    ):
        sides["pre"].spill, sides["post"].spill = a, b
        cow = BestOnWrite(sides, last=5, skip_last=True)

        def step(side, value):
            with torch.no_grad():
                for r in sides[side].raw.values():
                    r.add_(value)

        for i, (side, loss) in enumerate([("pre", 5.0), ("post", 6.0), ("pre", 4.0), ("post", 7.0)]):
            assert cow.before_step(i, loss, (side,))
            step(side, 0.25 * (i + 1))
        best = {s: {k: v.clone() for k, v in m.raw.items()} for s, m in sides.items()}  # after iteration 2
        best["post"] = {k: v - 1.0 for k, v in best["post"].items()}  # post's step 3 came after the best
        assert cow.before_step(4, 7.0, ("pre",)) and not cow.replay  # both held, off the device
        assert sides["pre"].has_best and sides["post"].has_best
        step("pre", 3.0)
        cow.finish()
        for s, m in sides.items():
            for k, v in m.raw.items():
                assert torch.equal(v, best[s][k]), (s, k)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "extra",
    [
        "method.mask.granularity=tensor",
        "method.mask.param=sigmoid",
        "method.adam_in_backward=false",
        "method.select=last",
        "method.best_masks=replay",
        "method.backward_chunk=4",
    ],
)
def test_offload_is_bitwise_with_every_other_setting(run_cfg, tmp_path, extra):
    """Scalar masks, 2·sigmoid masks, Adam after the backward, no selection copies, replay, chunked
    backwards: the offloaded run equals the resident one (full tier: six settings x two runs)."""
    _, out = run_cfg(*ARGS, extra, "method.offload=false")
    wa = load_file(str(out / "merged.safetensors"))
    ma = json.loads((out / "metrics.json").read_text())["acc_matrix"]
    off = tmp_path / "offload"
    off.mkdir()
    metrics, out = run_cfg(*ARGS, extra, "method.offload=true", f"method.offload_dir={off}")
    wb = load_file(str(out / "merged.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and metrics["acc_matrix"] == ma
    assert list(off.iterdir()) == []


def test_auto_decides_from_device_directory_and_budget(tmp_path, monkeypatch):
    """offload=auto: on for element masks on the CPU with offload_dir on a disk, off on a tmpfs and for
    tensor masks; on CUDA only where the masks, moments and copies would not fit the budget."""
    import otmf_exp.merging.otmf.ot_diagnostics as diag
    import otmf_exp.runtime.offload as mod

    cpu = torch.device("cpu")
    decide = diag.decide_offload
    assert decide(True, cpu, "tensor", 1.0, None, None) == (True, "set")
    assert decide(False, cpu, "element", 1.0, None, None) == (False, "set")
    assert decide("auto", cpu, "tensor", 1.0, None, None) == (False, "tensor_masks")
    monkeypatch.setattr(mod, "_filesystem", lambda d: "ext4")
    assert decide("auto", cpu, "element", 1.0, None, str(tmp_path)) == (True, "cpu_disk")
    monkeypatch.setattr(mod, "_filesystem", lambda d: "tmpfs")
    assert decide("auto", cpu, "element", 1.0, None, str(tmp_path)) == (False, "ram_dir")
    monkeypatch.setattr(mod, "_filesystem", lambda d: "ext4")
    free = mod.disk_room_mb(str(tmp_path))
    assert free is not None and free > 0
    # a disk without room for the moments and copies, or no directory: resident (offload=true would fail)
    assert decide("auto", cpu, "element", free * 2, None, str(tmp_path)) == (False, "no_room")
    assert decide("auto", cpu, "element", 1.0, None, str(tmp_path / "nope")) == (False, "no_room")
    # float64 masks (parity's float64 rows): the stores hold float32, so auto stays resident, true is refused
    assert decide("auto", cpu, "element", 1.0, None, str(tmp_path), float32=False) == (False, "not_float32")
    assert decide(False, cpu, "element", 1.0, None, None, float32=False) == (False, "set")
    with pytest.raises(UserError, match="float64"):
        decide(True, cpu, "element", 1.0, None, None, float32=False)
    calls = []

    def fits(need, budget, device):
        calls.append((need, budget))
        return need <= budget, budget

    monkeypatch.setattr(diag, "checkpoint_fits", fits)
    cuda = torch.device("cuda")
    assert decide("auto", cuda, "element", 100.0, 200.0, None) == (False, "fits")
    assert decide("auto", cuda, "element", 300.0, 200.0, None) == (True, "over_budget")
    assert calls == [(100.0, 200.0), (300.0, 200.0)]


def test_auto_is_the_default_recorded_and_bitwise(run_cfg, tmp_path, monkeypatch):
    """The default (auto) on the CPU offloads when $TMPDIR is on a disk, records why in steps.jsonl,
    and merges exactly what offload=false does; on a tmpfs it stays resident and says so."""
    import otmf_exp.runtime.offload as mod

    monkeypatch.setattr(mod, "_filesystem", lambda d: "ext4")
    _, out = run_cfg(*ARGS)
    wa, sa = load_file(str(out / "merged.safetensors")), _steps(out)
    fused = [s for s in sa if s.get("ot_loss_pre")]
    assert fused and all(s["offload"] is True and s["offload_reason"] == "cpu_disk" for s in fused)
    assert all(s["offload_mb"] > 0 for s in fused)
    monkeypatch.setattr(mod, "_filesystem", lambda d: "tmpfs")
    _, out = run_cfg(*ARGS)
    wb, sb = load_file(str(out / "merged.safetensors")), _steps(out)
    fused = [s for s in sb if s.get("ot_loss_pre")]
    assert all(s["offload"] is False and s["offload_reason"] == "ram_dir" for s in fused)
    assert all("offload_mb" not in s for s in fused)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
