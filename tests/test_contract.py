"""The method contract and the registry: what a new method needs, and the errors when a step is missed."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from otmf_exp import config
from otmf_exp.errors import UserError
from otmf_exp.merging import METHODS
from otmf_exp.merging.base import GROWTHS, ContinualState, MergeMethod


@pytest.mark.parametrize("name", sorted(METHODS))
def test_registered_method_declares_the_contract(name):
    cls = METHODS[name]
    assert issubclass(cls, MergeMethod) and cls.name == name
    assert dataclasses.is_dataclass(cls.Config) and cls.Config().name == name
    assert cls.protocols and set(cls.protocols) <= {"continual", "joint"}
    assert cls.state_growth in GROWTHS
    assert isinstance(cls.evaluates_individually, bool)
    if cls.main_coef is not None:
        assert cls.main_coef in {f.name for f in dataclasses.fields(cls.Config)}


def test_registry_and_yamls_agree():
    config.check_registry()
    presets = config.method_presets()
    assert sorted(set(config.method_yamls()) - set(presets)) == sorted(METHODS)
    assert set(presets.values()) <= set(METHODS)


@pytest.mark.parametrize("preset", sorted(config.method_presets()))
def test_method_preset_sets_only_what_differs_and_composes(preset, make_cfg):
    from importlib import resources

    method = config.method_presets()[preset]
    own = OmegaConf.create((resources.files("otmf_exp.conf") / "method" / f"{preset}.yaml").read_text())
    assert list(own.defaults) == [f"/schema/method/{method}@_here_", "_self_"] and "name" not in own
    defaults = OmegaConf.structured(METHODS[method].Config)
    keys = [k for k in own if k != "defaults"]
    assert keys and all(OmegaConf.select(own, k) != OmegaConf.select(defaults, k) for k in keys)
    cfg = make_cfg(f"method={preset}")
    assert cfg.method.name == method and all(cfg.method[k] == own[k] for k in keys)
    config.method_config(cfg)  # validates


def test_preset_of_an_unregistered_method_is_one_line(monkeypatch):
    monkeypatch.setattr(config, "method_yamls", lambda: [*sorted(METHODS), "ghost_preset"])
    monkeypatch.setattr(config, "method_of_yaml", lambda n: "ghost" if n == "ghost_preset" else n)
    with pytest.raises(
        UserError, match=r"conf/method/ghost_preset\.yaml has no registered method.*\"ghost\""
    ):
        config.check_registry()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_yaml_holds_only_what_differs_from_its_dataclass(name):
    from importlib import resources

    text = (resources.files("otmf_exp.conf") / "method" / f"{name}.yaml").read_text()
    own = OmegaConf.create(text)
    defaults = OmegaConf.structured(METHODS[name].Config)
    assert list(own.defaults) == [f"/schema/method/{name}@_here_", "_self_"]
    for key in own:
        if key != "defaults":
            assert OmegaConf.select(own, key) != OmegaConf.select(defaults, key), (
                f"{name}.yaml restates {key}"
            )


def test_schema_names_are_not_method_choices(make_cfg):
    with pytest.raises(MissingConfigException) as e:
        make_cfg("method=otmf_schema")
    listed = str(e.value)
    assert "otmf" in listed and "_schema" not in listed.split("Available options")[-1]


def test_forgotten_registration_is_one_line(monkeypatch, capsys):
    from otmf_exp import run

    monkeypatch.setattr(config, "method_yamls", lambda: [*sorted(METHODS), "newmethod"])
    with pytest.raises(SystemExit) as e:
        run.main()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "conf/method/newmethod.yaml has no registered method" in err[0]
    assert "METHODS in src/otmf_exp/merging/__init__.py" in err[0]


def test_registered_method_without_yaml_is_named(monkeypatch):
    monkeypatch.setitem(METHODS, "lonely", type("Lonely", (METHODS["averaging"],), {"name": "lonely"}))
    with pytest.raises(UserError, match=r"no conf/method/lonely\.yaml"):
        config.check_registry()


def test_state_advance_copies_and_counts():
    import torch

    s = ContinualState(0, {"w": torch.zeros(3)}, scalars={"a": 1})
    n = s.advance({"w": torch.ones(3)}, scalars={"a": 2}, extra={"e": torch.zeros(2)})
    assert (s.step, s.scalars, s.extra) == (0, {"a": 1}, {})
    assert n.step == 1 and n.scalars == {"a": 2} and n.nbytes() == 5 * 4
    assert n.advance().merged is n.merged and n.advance().heads is not n.heads


# ---- docs/extending.md: a toy method added through exactly the documented steps ---------------------
def _toy_source() -> str:
    """The example method of docs/extending.md, as the page shows it (its first python block)."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "extending.md").read_text()
    block = page.split("## A method", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    return textwrap.dedent(block)


TOY = _toy_source()


def test_toy_method_through_the_extending_steps(tmp_path, monkeypatch, zoo):
    from hydra import compose, initialize_config_module

    from otmf_exp.runner import run_experiment

    # 1. one file with a MergeMethod subclass (here in a temp dir instead of src/otmf_exp/merging/)
    (tmp_path / "toy_method.py").write_text(textwrap.dedent(TOY))
    spec = importlib.util.spec_from_file_location("toy_method", tmp_path / "toy_method.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "toy_method", module)
    spec.loader.exec_module(module)
    # 2. one registry line
    monkeypatch.setitem(METHODS, "toy", module.Toy)
    config.register_configs()
    # 3. one YAML holding only its defaults line
    (tmp_path / "conf" / "method").mkdir(parents=True)
    (tmp_path / "conf" / "method" / "toy.yaml").write_text(
        "defaults:\n  - /schema/method/toy@_here_\n  - _self_\n"
    )
    search = f"hydra.searchpath=[file://{(tmp_path / 'conf').as_posix()}]"
    with initialize_config_module("otmf_exp.conf", version_base="1.3"):
        cfg = compose("run", overrides=[search, "method=toy", "task_order=[rot90,flip]", "progress=false"])
        assert cfg.method.scale == 0.25
        m = run_experiment(cfg, tmp_path / "run")
        cfg_alpha = compose("run", overrides=[search, "method=toy", "alpha=0.5", "progress=false"])
        cfg_bad = compose("run", overrides=[search, "method=toy", "method.scale=-1", "progress=false"])
    assert m["method"] == "toy" and len(m["acc_matrix"]) == 2 and 0 <= m["acc"] <= 100
    assert config.method_config(cfg_alpha).scale == 0.5  # main_coef: the top-level alpha sets it
    with pytest.raises(UserError, match=r"^method\.scale must be >= 0, got -1\.0$"):  # its declared range
        config.check_values(cfg_bad)


def test_check_state_default_accepts_theta0_plus_modules_and_names_a_mismatch():
    import torch

    from otmf_exp.merging.task_arithmetic.averaging import Averaging

    m = Averaging(Averaging.Config(), None)
    pre = {"w": torch.zeros(2, 3)}
    m.check_state(ContinualState(1, {}), pre)  # merged model = θ₀ + the method's modules
    m.check_state(ContinualState(1, {"w": torch.ones(2, 3)}), pre)
    with pytest.raises(ValueError, match="shape at 'w'"):
        m.check_state(ContinualState(1, {"w": torch.ones(3, 2)}), pre)
