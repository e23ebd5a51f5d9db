"""hub.prefetch reads a whole sweep; a missing hub id offline fails fast and a sweep says it once."""

from __future__ import annotations

import sys
import time

import pytest

from otmf_exp.hub import prefetch, resolve
from otmf_exp.runtime import sweep


def _ids(out: str) -> list[str]:
    return [line.split()[1] for line in out.splitlines() if line.strip()]


def test_prefetch_lists_every_job_of_a_sweep_once(capsys) -> None:
    argv = ["backbone=clip_vit_b32,clip_vit_b16", "task_seq=vit8", "method=averaging,ties", "seed=0,1"]
    assert prefetch.main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr()
    ids = _ids(out.out)
    assert len(ids) == len(set(ids)) == 2 + 2 * 8 + 8  # 2 base models, 2 x 8 fine-tuned, 8 datasets
    assert {"openai/clip-vit-base-patch32", "openai/clip-vit-base-patch16"} <= set(ids)
    assert "tanganke/clip-vit-base-patch16_mnist" in ids and "tanganke/clip-vit-base-patch32_mnist" in ids
    assert out.err.strip() == "8 jobs, 26 distinct ids"
    # the base job alone lists only its own ids
    assert prefetch.main(["task_seq=vit8"]) == 0
    assert len(_ids(capsys.readouterr().out)) == 1 + 8 + 8


def test_sweep_ids_unions_dataset_splits() -> None:
    n, refs = prefetch.sweep_ids(["task_seq=vit8", "task_order=[mnist,svhn],[svhn]"])
    assert n == 2
    data = [r for r in refs if r[0] == "dataset"]
    assert [r[1] for r in data].count("ufldl-stanford/svhn") == 1


@pytest.mark.parametrize("flag", ["--download", "--check"])
def test_download_offline_is_one_line(flag: str, capsys) -> None:  # HF_HUB_OFFLINE=1 (conftest)
    t0 = time.perf_counter()
    rc = prefetch.main(["task_seq=vit8", flag])
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert rc == 2 and len(err) == 1 and time.perf_counter() - t0 < 10
    assert err[0].startswith(f"error: {flag} needs the hub, which is off here (HF_HUB_OFFLINE=1")


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """No HF_HUB_OFFLINE, an empty HF cache and a hub endpoint that refuses connections."""
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(resolve, "_PROBE", {})
    probes: list[str] = []
    real = resolve._reachable

    def probe(url: str, timeout: float) -> bool:
        probes.append(url)
        return real(url, timeout)

    monkeypatch.setattr(resolve, "_reachable", probe)
    monkeypatch.setattr(resolve, "_probe_url", lambda: "http://127.0.0.1:9/api/models")  # port 9: refused
    return probes


def test_missing_id_unreachable_hub_fails_fast(unreachable_hub) -> None:
    from huggingface_hub import constants

    t0 = time.perf_counter()
    for i in range(3):
        with pytest.raises(Exception) as e:
            resolve.resolve_model_dir(f"nobody/missing{i}", None)
        assert type(e.value).__name__ == "UserError"
        assert str(e.value).startswith(
            f"model 'nobody/missing{i}' not in the local HF cache and the hub is not"
        )
    assert time.perf_counter() - t0 < 5  # no hub retries (the old path: ~24 s per dataset)
    assert unreachable_hub == ["http://127.0.0.1:9/api/models"]  # probed once per process
    assert constants.HF_HUB_OFFLINE is True


def test_reachable_probe_keeps_online(monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(resolve, "_PROBE", {})
    monkeypatch.setattr(resolve, "_reachable", lambda url, timeout: True)
    assert resolve.hub_offline() is False and constants.HF_HUB_OFFLINE is False


def test_report_groups_identical_errors(tmp_path) -> None:
    same = "model 'x/y' not in the local HF cache and the hub is not reachable: fetch it"
    for job in range(7):
        assert sweep.repeated(tmp_path, same) is (job > 0)
        sweep.record_failure(tmp_path, job, [f"seed={job}"], same, "UserError")
    sweep.record_failure(tmp_path, 7, ["seed=7", "method.scaling=nan"], "other error", "UserError")
    lines = sweep.report(tmp_path, sweep.failures(tmp_path))
    assert lines[0].startswith("sweep finished with 8 failed job(s)")
    assert lines[1:] == [
        f"  7 jobs (#0, #1, #2, #3, #4, ...): {same}",
        "  job #7 [seed=7 method.scaling=nan]: other error",
    ]


def test_sweep_of_missing_ids_prints_the_error_once(monkeypatch, capsys, tmp_path) -> None:
    from otmf_exp import run

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("OTMF_EXP_CACHE", str(tmp_path / "cache"))
    argv = ["-m", "backbone=clip_vit_b32", "task_seq=vit8", "method=averaging", "seed=0,1"]
    monkeypatch.setattr(
        sys, "argv", ["otmf_exp.run", *argv, "progress=false", f"hydra.sweep.dir={tmp_path}/sw"]
    )
    with pytest.raises(SystemExit) as e:
        run.main()
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()
    errors = [x for x in err if x.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: job #0: model 'openai/clip-vit-base-patch32' not in"
    )
    assert err[-1].startswith("  2 jobs (#0, #1): model 'openai/clip-vit-base-patch32' not in the local HF")
