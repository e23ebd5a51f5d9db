"""Every option of every config group composes; typos fail at compose time."""

from pathlib import Path

import otmf_exp.conf
import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from otmf_exp import config

CONF = Path(otmf_exp.conf.__file__).parent


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["backbone", "task_seq", "method", "logger"])
def test_every_option_composes(make_cfg, group):
    opts = _options(group)
    assert opts, group
    for opt in opts:
        cfg = make_cfg(f"{group}={opt}")
        # a method preset (conf/method/c_adamerging.yaml) configures the method it extends
        assert cfg[group].name == (config.method_presets().get(opt, opt) if group == "method" else opt)


def test_every_yaml_under_conf_composes(make_cfg):
    """Each file under conf/ is composed through the override that selects it; none is left out."""
    from hydra import compose, initialize_config_module

    composed = set()
    for path in sorted(CONF.rglob("*.yaml")):
        rel = path.relative_to(CONF).with_suffix("").as_posix()
        group, _, option = rel.rpartition("/")
        if rel == "run":
            cfg = make_cfg()
        elif group.startswith("experiment"):
            cfg = make_cfg(f"experiment={rel[len('experiment/') :]}")
        elif group == "hydra/launcher":
            with initialize_config_module(config_module="otmf_exp.conf", version_base="1.3"):
                cfg = compose("run", overrides=[f"hydra/launcher={option}"], return_hydra_config=True)
            assert cfg.hydra.launcher._target_
        else:
            cfg = make_cfg(f"{group}={option}")
            assert cfg[group].name == (
                config.method_presets().get(option, option) if group == "method" else option
            )
        assert cfg.method.name and cfg.task_seq.name and cfg.backbone.name
        composed.add(rel)
    assert composed == {p.relative_to(CONF).with_suffix("").as_posix() for p in CONF.rglob("*.yaml")}
    assert len(composed) > 40


def test_defaults_are_the_offline_suite(make_cfg):
    cfg = make_cfg()
    assert cfg.task_seq.name == "digits8" and cfg.backbone.name == "tiny"
    assert cfg.method.name == "otmf" and cfg.method.alpha == 0.8
    assert cfg.alpha is None and cfg.protocol == "continual"


def test_typo_in_method_key_fails_at_compose(make_cfg):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        make_cfg("method.itrations=5")


def test_typo_in_top_level_key_fails(make_cfg):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        make_cfg("alpah=0.5")


def test_unknown_method_lists_choices(make_cfg):
    with pytest.raises(ConfigCompositionException) as e:
        make_cfg("method=nope")
    assert "task_arithmetic" in str(e.value) and "otmf" in str(e.value)
