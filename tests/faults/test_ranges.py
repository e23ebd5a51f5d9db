"""Issue 39 class 7 (ranges that mean something): degenerate cross-field settings are refused in
one line before any model or data is loaded (``config.check_cross_fields``)."""

from __future__ import annotations

import pytest

from faults.conftest import RUN, one_error

TWO = "task_order=[rot90,rot180]"


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Building a backbone fails the test: every refusal here comes before it."""
    from otmf_exp import runner

    def forbidden(*a, **k):
        raise AssertionError("a model was built before the config was refused")

    monkeypatch.setattr(runner, "build_backbone", forbidden)


@pytest.mark.parametrize(
    "extra, text",
    [
        (["method=consensus", "method.k=0"], "method.k=0 keeps every entry"),
        (["method=consensus", "method.k=3"], "method.k=3 exceeds the 2 task masks"),
        (["method=consensus", "method.k=3", "protocol=joint"], "method.k=3 exceeds the 2 task masks"),
        (["method=continual_finetune", "method.split=test"], "trains on the split that is evaluated"),
    ],
)
def test_degenerate_settings_are_one_line(run_main, tmp_path, no_heavy_work, extra, text):
    rc, _, err = run_main(*RUN, TWO, f"out_dir={tmp_path / 'o'}", *extra)
    one_error(err, 2, rc, text)


def test_leakage_on_purpose_passes_the_rule(tmp_path):
    from hydra import compose, initialize_config_module

    from otmf_exp.config import check_cross_fields

    with initialize_config_module(config_module="otmf_exp.conf", version_base="1.3"):
        cfg = compose(
            config_name="run",
            overrides=["method=continual_finetune", "method.split=test", "method.train_on_eval_split=true"],
        )
    check_cross_fields(cfg, ["rot90", "rot180"])  # no error: said on purpose


def test_offload_dir_naming_a_file_is_refused_before_step_1(run_main, tmp_path, no_heavy_work):
    f = tmp_path / "afile"
    f.write_text("x")
    for where, what in ((f, "is a file"), (tmp_path / "nope", "does not exist")):
        rc, _, err = run_main(
            *RUN,
            TWO,
            "method=otmf",
            "method.offload=true",
            f"method.offload_dir={where}",
            f"out_dir={tmp_path / 'o'}",
        )
        one_error(err, 2, rc, f"method.offload_dir={where} {what}")
