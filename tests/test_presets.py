"""Every paper preset composes with the package's configs, every swept job composes and validates,
and the launchers exist. A preset naming an option that does not exist fails (no skip)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, MissingConfigException

from otmf_exp.config import check_run_config, method_config, method_presets

CONF = resources.files("otmf_exp.conf")
PRESETS = sorted(p.name[:-5] for p in (CONF / "experiment" / "paper").iterdir() if p.name.endswith(".yaml"))
#: job counts documented in docs/reproducing.md (checked against that page below)
JOBS = {
    "continual_vision": 900,
    "joint_vision": 8,
    "glue8_continual": 10,
    "mingle_star": 90,
    "ablation_alpha": 5,
    "ablation_masks": 2,
    "ablation_head_tuning": 2,
    "ablation_sinkhorn": 8,
    "ablation_pre_data": 2,
    "ablation_mask_granularity": 2,
    "ablation_schedule": 2,
    "ablation_iterations": 4,
    "ablation_head_split": 4,
    "two_task": 3,
}
PROTOCOL = {"joint_vision": "joint"}


@pytest.fixture(scope="module", autouse=True)
def _hydra():
    with initialize_config_module(config_module="otmf_exp.conf", version_base="1.3"):
        yield


def _compose(overrides: list[str], hydra_cfg: bool = False):
    return compose(config_name="run", overrides=["progress=false", *overrides], return_hydra_config=hydra_cfg)


def _jobs(params: dict) -> list[list[str]]:
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return BasicSweeper.split_arguments(parsed, None)[0]


def _sample(jobs: list[list[str]]) -> list[list[str]]:
    """First job + for every swept key, one job per value (the others as in the first job)."""
    first = jobs[0]
    out = [first]
    for i in range(len(first)):
        seen = {first[i]}
        for j in jobs:
            if j[i] not in seen and all(j[k] == first[k] for k in range(len(first)) if k != i):
                seen.add(j[i])
                out.append(j)
    return out


def test_presets_present():
    assert set(PRESETS) == set(JOBS)


def test_job_counts_in_the_docs():
    """docs/reproducing.md's preset table states each preset's job count; they are the counts above."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "reproducing.md").read_text()
    stated = {}
    for line in page.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].strip("`") in JOBS and cells[3].isdigit():
            stated[cells[0].strip("`")] = int(cells[3])
    assert stated == JOBS


def _check_preset(name: str) -> None:
    cfg = _compose([f"experiment=paper/{name}"], True)
    assert cfg.protocol == PROTOCOL.get(name, "continual")  # a preset's top-level keys win over run.yaml
    assert str(cfg.hydra.sweep.dir).startswith(f"multirun/paper/{name}/")
    jobs = _jobs(dict(cfg.hydra.sweeper.params))
    assert len(jobs) == JOBS[name]
    for job in _sample(jobs):
        c = _compose([f"experiment=paper/{name}", *job], False)
        for o in job:
            key, value = o.split("=", 1)
            if key in ("backbone", "task_seq"):
                assert c[key].name == value, (key, value)
            elif key == "method":  # a method preset (conf/method/c_adamerging.yaml) configures its method
                assert c.method.name == method_presets().get(value, value), (key, value)
            elif key == "alpha":
                assert c.alpha == float(value)
            elif key.startswith("method."):
                node = c.method
                for part in key.split(".")[1:]:
                    node = node[part]  # the field exists in the method's schema
                assert str(node) == value
        check_run_config(c)  # the run-time checks pass too (protocol support, alpha range, ...)
        method_config(c)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_with_package_configs(name):
    _check_preset(name)


def test_continual_vision_orders_and_overrides():
    cfg = _compose(["experiment=paper/continual_vision"], True)
    assert cfg.task_order == "shuffled"
    assert str(cfg.hydra.sweeper.params.order_seed) == ",".join(str(s) for s in range(42, 52))
    c = _compose(["experiment=paper/continual_vision", "backbone=clip_vit_l14", "task_seq=vit20"])
    assert (c.backbone.name, c.task_seq.name) == ("clip_vit_l14", "vit20")  # beats task_seq's default


def test_plus_experiment_is_rejected():
    """`experiment` is already in run.yaml's defaults: select presets with `experiment=`, not `+experiment=`."""
    with pytest.raises(ConfigCompositionException, match="Multiple values for experiment"):
        _compose(["+experiment=paper/ablation_alpha"])


@pytest.mark.parametrize(
    ("launcher", "target", "fields"),
    [
        ("joblib", "JoblibLauncher", {"n_jobs": -1}),
        ("local_parallel", "JoblibLauncher", {"n_jobs": 2}),
        ("submitit_slurm", "SlurmLauncher", {}),
        ("slurm_gpu", "SlurmLauncher", {"gpus_per_node": 1, "partition": None, "timeout_min": 240}),
    ],
)
def test_launchers_compose(launcher, target, fields):
    # the launchers are part of `make setup` (extra `launchers`): a missing plugin fails, never skips
    cfg = _compose([f"hydra/launcher={launcher}"], hydra_cfg=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    for k, v in fields.items():
        assert cfg.hydra.launcher[k] == v


def test_preset_with_a_misspelled_option_fails(tmp_path):
    """A preset whose defaults name a method that does not exist is an error, never a skip."""
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "broken.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /method: otmf_typo\n"
    )
    with pytest.raises(MissingConfigException, match="otmf_typo"):
        _compose([f"hydra.searchpath=[file://{tmp_path.as_posix()}]", "experiment=broken"])


def test_mingle_in_the_continual_presets_and_mingle_star():
    for name in ("continual_vision", "glue8_continual"):
        cfg = _compose([f"experiment=paper/{name}"], True)
        assert "mingle" in str(cfg.hydra.sweeper.params.method).split(",")
    c = _compose(["experiment=paper/mingle_star", "backbone=clip_vit_b32"])
    assert c.method.name == "mingle" and list(c.method.lora_layer) == ["attn", "fc1"]
    assert c.task_order == "shuffled" and method_config(c).lora_r == 64
