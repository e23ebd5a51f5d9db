"""The schemas' value declarations (``otmf_exp.schema``): every numeric field declares its range, every
default is inside it, and any value drawn outside it (hypothesis) is one ``error:`` line, exit 2,
nothing written, for every field of every method and of the top-level groups."""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import MISSING, OmegaConf

from otmf_exp import config, run, schema
from otmf_exp.errors import UserError
from otmf_exp.merging import METHODS
from otmf_exp.schema import Rule, SchemaError, choice, num

#: (prefix in the composed config, method to compose with, schema)
SCHEMAS = [("", "otmf", config.RunConfig)] + [
    ("method.", m, cls.Config) for m, cls in sorted(METHODS.items())
]
FIELDS = [
    (prefix, method, path, rule)
    for prefix, method, cls in SCHEMAS
    for path, rule, _ in schema.declarations(cls)
    if rule.checked_by is None
]
SETTINGS = settings(
    max_examples=4,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _leaves(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted path, annotation) of every leaf field of a dataclass schema, nested ones included."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = schema._strip_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            out += _leaves(tp, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", tp))
    return out


def test_every_numeric_field_of_every_schema_declares_its_range():
    declared = {(id(cls), p): r for _, _, cls in SCHEMAS for p, r, _ in schema.declarations(cls)}
    numeric = [(cls, p) for _, _, cls in SCHEMAS for p, tp in _leaves(cls) if schema._is_numeric(tp)]
    assert len(numeric) > 90  # RunConfig (+ backbone, task_seq, logger) and every method's Config
    for cls, path in numeric:
        rule = declared.get((id(cls), path))
        assert rule is not None, f"{cls.__name__}.{path} has no declaration"
        assert rule.numeric or rule.choices is not None or rule.checked_by, f"{cls.__name__}.{path}: {rule}"


def test_every_default_is_inside_its_declared_range():
    groups = (config.BackboneConfig, config.TaskSeqConfig, config.LoggerConfig)
    checked = 0
    for cls in (*groups, *(c for _, _, c in SCHEMAS)):
        defaults = OmegaConf.to_container(OmegaConf.structured(cls))
        for path, rule, _ in schema.declarations(cls):
            present, value = schema._get(defaults, path)
            if present and value != MISSING:
                assert schema.problem(rule, value) is None, f"{cls.__name__}.{path}={value!r}"
                checked += 1
    assert checked > 130


@dataclass
class Inner:
    ok: int = num(1, ge=1)
    rate: float = 0.5  # a new field nobody declared


@dataclass
class NewConfig:
    name: str = "new"
    inner: Inner = field(default_factory=Inner)


@dataclass
class BadConfig:
    flag: bool = choice(True, (True, False))


def test_a_field_without_declaration_is_refused_at_registration(monkeypatch):
    class New(METHODS["averaging"]):
        name = "new"
        Config = NewConfig

    with pytest.raises(SchemaError, match=r"^Inner\.rate \(inner\.rate\) is a numeric field without"):
        schema.declarations(NewConfig)
    monkeypatch.setitem(METHODS, "new", New)
    with pytest.raises(SchemaError, match="inner.rate"):
        config.register_configs()


def test_declarations_that_do_not_fit_their_field_are_refused():
    with pytest.raises(SchemaError, match="bool field needs no declaration"):
        schema.declarations(BadConfig)
    with pytest.raises(TypeError, match="needs a range"):
        num(1)


def test_messages_name_the_range():
    cases = [
        (Rule(gt=0), 0.0, "must be > 0, got 0.0"),
        (Rule(ge=0, le=1, null=True), 1.5, "must be in [0, 1] or null, got 1.5"),
        (Rule(gt=0, le=1), float("nan"), "must be a finite number in (0, 1], got nan"),
        (Rule(unbounded=True), float("inf"), "must be a finite number, got inf"),
        (Rule(ge=1, integer=True, also=("auto",)), 0, "must be auto or an integer >= 1, got 0"),
        (Rule(ge=1, int_typed=True), 2.5, "must be >= 1, got 2.5"),
        (Rule(choices=("a", "b")), "c", "must be one of ['a', 'b'], got 'c'"),
        (Rule(choices=("auto", True, False)), 1, "must be one of ['auto', true, false], got 1"),
        (Rule(ge=0), True, "must be >= 0, got true"),
    ]
    for rule, value, msg in cases:
        assert schema.problem(rule, value) == msg
    assert schema.problem(Rule(ge=1, integer=True, also=("auto",)), "auto") is None
    assert schema.problem(Rule(choices=("auto", True, False)), True) is None


def test_a_choice_needing_a_missing_package_names_the_pip_line(monkeypatch, make_cfg):
    monkeypatch.setattr(schema.importlib.util, "find_spec", lambda name: None)
    for override in ("method.sinkhorn.backend=online", "method.sinkhorn.backend=multiscale"):
        with pytest.raises(UserError) as e:
            config.check_values(make_cfg(override))
        assert str(e.value) == (
            f"{override} needs the optional package pykeops, not installed: pip install pykeops"
        )
    with pytest.raises(UserError, match="picks a KeOps backend, which needs .*: pip install pykeops"):
        config.method_config(make_cfg("method.sinkhorn.backend=auto", "method.batch_size=6000"))
    config.method_config(make_cfg("method.sinkhorn.backend=auto"))  # 16² pairs: tensorized, no KeOps
    config.method_config(make_cfg("method.sinkhorn.backend=tensorized"))


# ---- values outside each declared range (hypothesis) ------------------------------------------------
_WORD = "abcdefghijklmnopqrstuvwxyz_0123456789"  # no ${...}: a value, never an interpolation


def _outside(rule: Rule) -> st.SearchStrategy[Any]:
    """Values the rule refuses: below/above the bounds, non-finite floats, wrong types, other choices."""
    if rule.choices is not None:
        ok = [c for c in rule.choices if not isinstance(c, bool)] + [*rule.also, *rule.aliases]
        pool: list[st.SearchStrategy[Any]] = [st.text(alphabet=_WORD, min_size=1, max_size=8)]
        if any(isinstance(c, int) and not isinstance(c, bool) for c in rule.choices):
            pool = [st.integers(-50, 50)]  # an int field (sinkhorn.p, router_hidden_layers)
        return st.one_of(pool).filter(lambda v: not any(schema._same(v, c) for c in ok))
    integer = rule.integer or rule.int_typed
    outs: list[st.SearchStrategy[Any]] = []
    if rule.ge is not None or rule.gt is not None:  # below the lower bound
        lo = rule.ge if rule.ge is not None else rule.gt
        if integer:
            top = math.ceil(lo) - 1 if rule.ge is not None else math.floor(lo)
            outs.append(st.integers(min_value=top - 10**6, max_value=top))
        else:
            outs.append(st.floats(max_value=lo, exclude_max=rule.ge is not None, allow_nan=False))
    if rule.le is not None or rule.lt is not None:  # above the upper bound
        hi = rule.le if rule.le is not None else rule.lt
        if integer:
            bottom = math.floor(hi) + 1 if rule.le is not None else math.ceil(hi)
            outs.append(st.integers(min_value=bottom, max_value=bottom + 10**6))
        else:
            outs.append(st.floats(min_value=hi, exclude_min=rule.le is not None, allow_nan=False))
    if not integer:
        outs.append(st.sampled_from([math.nan, math.inf, -math.inf]))
    if rule.integer and not rule.int_typed:  # an Any field (threads): non-integers too
        outs.append(st.sampled_from([1.5, "many", True]))
    return st.one_of(outs)


@pytest.fixture(scope="module")
def composed():
    """One composed config per method (composing costs ~0.1 s; each example edits a copy)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="otmf_exp.conf", version_base="1.3"):
        return {m: compose("run", overrides=["progress=false", f"method={m}"]) for m in METHODS}


def _with(cfg: Any, key: str, value: Any) -> Any:
    c = cfg.copy()
    OmegaConf.update(c, key, value, merge=False)
    return c


def _refused(monkeypatch, tmp_path, cfg: Any, key: str) -> str:
    """The one line ``Experiment(...)`` refuses ``cfg`` with, before any model, data or file."""
    import otmf_exp.runner as runner

    def no_heavy_work(*a, **k):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr(runner, "build_backbone", no_heavy_work)
    out = tmp_path / "run"
    with pytest.raises(UserError) as e:
        runner.Experiment(cfg, out)
    assert not out.exists()
    return str(e.value)


@pytest.mark.parametrize("prefix, method, path, rule", FIELDS, ids=[f"{m}:{p}{k}" for p, m, k, _ in FIELDS])
@SETTINGS
@given(data=st.data())
def test_a_value_outside_the_declared_range_is_one_line(
    composed, monkeypatch, tmp_path, prefix, method, path, rule, data
):
    key = f"{prefix}{path}"
    if rule.keys is not None:  # a dict field (task_seq.split_sizes): a bad value or a bad key
        bad = data.draw(st.sampled_from([{"train": -1}, {"dev": 4}]), label="value")
    else:
        bad = data.draw(_outside(rule), label="value")
    cfg = _with(composed[method], key, bad)
    msg = _refused(monkeypatch, tmp_path, cfg, key)
    assert "\n" not in msg and msg.startswith(key), msg
    if rule.keys is None and rule.choices is None:
        assert rule.describe() in msg, msg  # names the range


def test_the_cli_path_is_one_error_line_exit_2_nothing_written(tmp_path, capsys, monkeypatch):
    """``otmf_exp.run.main`` in-process, one out-of-range value per group and several methods."""
    cases = [
        ("method.backward_chunk=-1", "error: method.backward_chunk must be >= 1 or null, got -1"),
        ("method.head_tuning.fraction=1.5", "error: method.head_tuning.fraction must be in (0, 1], got 1.5"),
        ("backbone.batch_size=0", "error: backbone.batch_size must be >= 1, got 0"),
        ("logger.mode=sometimes", "error: logger.mode must be one of ['online', 'offline', 'disabled'] or"),
        ("seed=-3", "error: seed must be an integer in [0, 4294967295], got -3"),
        ("method=wemoe method.lora_rank=0", "error: method.lora_rank must be >= 1 or null, got 0"),
        (
            "method=dop method.ema_beta=nan",
            "error: method.ema_beta must be a finite number in [0, 1], got nan",
        ),
    ]
    for i, (override, line) in enumerate(cases):
        out = tmp_path / f"run{i}"
        argv = ["otmf_exp.run", f"out_dir={out}", "progress=false", *override.split()]
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as e:
            run.main()
        err = capsys.readouterr().err
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert e.value.code == 2 and len(errors) == 1 and errors[0].startswith(line), err
        assert "Traceback" not in err and not out.exists()
