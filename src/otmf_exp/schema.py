"""Value declarations of the config schemas: each field's range or choices next to its default.

``lr: float = num(1e-2, gt=0)``, ``steps: int = num(100, ge=0)``, ``split: str = choice("train",
*SPLITS)``, ``init: float = num(0.0, unbounded=True)``. :func:`declarations` collects them (and refuses
a numeric field without one: a new field cannot go unchecked), :func:`check` enforces them on a
composed config. Nulls follow the annotation (``float | None`` allows null), integers too (``int``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from otmf_exp.errors import UserError

#: split names every task-data loader knows (``data.base.SPLITS``)
SPLITS = ("train", "validation", "test")
#: seeds: numpy's range (torch accepts it too; the per-step seed ``seed·1000 + step`` stays in range)
SEED_MAX = 2**32 - 1
_KEY = "otmf_exp.rule"


@dataclass(frozen=True)
class Rule:
    """What one field accepts. Numbers: ``ge``/``gt``/``le``/``lt`` (finite always), ``integer``;
    ``unbounded`` says on purpose that any finite number goes. ``choices``: a fixed set; ``needs``:
    ``{choice: (module, pip line)}`` for a choice that needs an optional package; ``also``: literal
    values accepted besides the range (``threads: auto``); ``checked_by``: a field whose values are
    checked by the named function instead (e.g. ``task_order``: names of tasks). ``keys``: the
    allowed keys of a dict field (its values follow the rule)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    integer: bool = False
    unbounded: bool = False
    choices: tuple[Any, ...] | None = None
    needs: Mapping[Any, tuple[str, str]] | None = None
    also: tuple[Any, ...] = ()
    checked_by: str | None = None
    keys: tuple[str, ...] | None = None
    #: old spellings still accepted, not advertised (AdaMerging ``clamp: true``)
    aliases: tuple[Any, ...] = ()
    null: bool = False  # filled from the annotation by declarations()
    int_typed: bool = False  # annotated int: an integer, enforced without saying so in messages

    @property
    def numeric(self) -> bool:
        bounds = (self.ge, self.gt, self.le, self.lt)
        return self.unbounded or self.integer or any(b is not None for b in bounds)

    def describe(self) -> str:
        """``> 0``, ``in (0, 1]``, ``an integer >= 1``, ``one of ['a', 'b']`` (+ ``or null``)."""
        if self.choices is not None:
            text = f"one of [{', '.join(repr(c) if isinstance(c, str) else _val(c) for c in self.choices)}]"
        else:
            lo = (
                f"[{_num(self.ge)}"
                if self.ge is not None
                else f"({_num(self.gt)}"
                if self.gt is not None
                else None
            )
            hi = (
                f"{_num(self.le)}]"
                if self.le is not None
                else f"{_num(self.lt)})"
                if self.lt is not None
                else None
            )
            if lo and hi:
                text = f"in {lo}, {hi}"
            elif lo:
                text = (">= " if lo[0] == "[" else "> ") + lo[1:]
            elif hi:
                text = ("<= " if hi[-1] == "]" else "< ") + hi[:-1]
            else:
                text = "a finite number"
            if self.integer:
                text = "an integer" + ("" if text == "a finite number" else f" {text}")
        return " or ".join([*(str(_show(a)) for a in self.also), text]) + (" or null" if self.null else "")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else repr(x)


def _show(v: Any) -> Any:
    return {True: "true", False: "false", None: "null"}.get(v, v) if isinstance(v, (bool, type(None))) else v


def _val(v: Any) -> str:
    return str(_show(v)) if isinstance(v, (bool, type(None))) else repr(v)


def _field(default: Any, rule: Rule) -> Any:
    meta = {_KEY: rule}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def num(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    integer: bool = False,
    unbounded: bool = False,
    also: tuple[Any, ...] = (),
    keys: tuple[str, ...] | None = None,
) -> Any:
    """A numeric field: its default and its range (``unbounded=True``: any finite number, on purpose)."""
    rule = Rule(ge=ge, gt=gt, le=le, lt=lt, integer=integer, unbounded=unbounded, also=also, keys=keys)
    if not rule.numeric:
        raise TypeError("num() needs a range (ge/gt/le/lt/integer) or unbounded=True")
    return _field(default, rule)


def choice(
    default: Any,
    options: Any,
    needs: Mapping[Any, tuple[str, str]] | None = None,
    aliases: tuple[Any, ...] = (),
) -> Any:
    """A field with a fixed set of values (``options``, an iterable); ``needs={value: (module,
    "pip install ...")}`` for a value that needs an optional package; ``aliases``: old spellings."""
    return _field(default, Rule(choices=tuple(options), needs=needs, aliases=tuple(aliases)))


def checked_by(default: Any, where: str) -> Any:
    """A field whose values another function checks (named in the declaration, e.g. ``resolve_order``)."""
    return _field(default, Rule(checked_by=where))


_NEUTRAL = "otmf_exp.result_neutral"


def neutral(default: Any, *, tables_only: bool = False) -> Any:
    """A field declared ``result_neutral``: its value cannot change a result (where output goes, the
    console, threads, a bit-identical memory lever such as ``method.offload``), so it never splits
    table rows and a resume never compares it. ``tables_only=True``: results agree to float noise
    only (``device``, evaluation batching): tables pool them, a resume still compares them.
    ``default`` may be a value or another declaration (``neutral(num("auto", ge=1))``)."""
    scope = "tables" if tables_only else "result"
    if isinstance(default, dataclasses.Field):
        meta = {**default.metadata, _NEUTRAL: scope}
        if default.default_factory is not dataclasses.MISSING:
            return field(default_factory=default.default_factory, metadata=meta)
        return field(default=default.default, metadata=meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={_NEUTRAL: scope})
    return field(default=default, metadata={_NEUTRAL: scope})


@functools.cache
def neutral_keys(cls: type, prefix: str = "", tables: bool = False) -> tuple[str, ...]:
    """Dotted paths of the fields of dataclass ``cls`` (nested dataclasses included) declared
    :func:`neutral`; ``tables=True`` adds the ``tables_only`` ones."""
    out: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        scope = f.metadata.get(_NEUTRAL)
        tp, _ = _strip_optional(hints[f.name])
        if scope == "result" or (tables and scope == "tables"):
            out.append(f"{prefix}{f.name}")
        elif dataclasses.is_dataclass(tp):
            out.extend(neutral_keys(tp, f"{prefix}{f.name}.", tables))
    return tuple(out)


# ---- collecting the declarations ---------------------------------------------------------------
class SchemaError(UserError):
    """A schema field without a declaration (a bug of the code, found at registration time)."""


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else Any), True
    return tp, False


def _is_numeric(tp: Any) -> bool:
    """Can the field hold a number (int, float, Any, or a container of them)?"""
    if tp is Any:
        return True
    if tp in (int, float):
        return True
    origin = typing.get_origin(tp)
    if origin in (list, dict, tuple) or origin in (typing.Union, types.UnionType):
        return any(_is_numeric(a) for a in typing.get_args(tp))
    return False


@functools.cache
def declarations(cls: type, prefix: str = "") -> tuple[tuple[str, Rule, Any], ...]:
    """``(dotted path, rule, type)`` of every declared leaf of the dataclass ``cls`` (nested dataclasses
    included). Raises :class:`SchemaError` for a numeric field (int, float, Any or a container of them)
    without a declaration, or a declaration that does not fit its field."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        tp, optional = _strip_optional(hints[f.name])
        rule = f.metadata.get(_KEY)
        if dataclasses.is_dataclass(tp) and rule is None:
            out.extend(declarations(tp, f"{path}."))
            continue
        if rule is None:
            if _is_numeric(tp):
                raise SchemaError(
                    f"{cls.__name__}.{f.name} ({path}) is a numeric field without a declared range: "
                    "declare it, e.g. num(default, ge=0) or num(default, unbounded=True) (otmf_exp.schema)"
                )
            continue
        if tp is bool:
            raise SchemaError(f"{cls.__name__}.{f.name}: a bool field needs no declaration")
        if rule.numeric and tp not in (int, float, Any) and not _is_numeric(tp):
            raise SchemaError(f"{cls.__name__}.{f.name}: a range on a non-numeric field")
        int_typed = rule.numeric and (tp is int or typing.get_args(tp)[-1:] == (int,))
        rule = dataclasses.replace(rule, null=optional, int_typed=int_typed)
        out.append((path, rule, tp))
    return tuple(out)


# ---- enforcing them ------------------------------------------------------------------------------
def _same(a: Any, b: Any) -> bool:
    return a == b and (isinstance(a, bool) == isinstance(b, bool))


def problem(rule: Rule, value: Any) -> str | None:
    """What is wrong with ``value`` under ``rule`` (``must be ..., got ...``), or None."""
    if value is None and rule.null:
        return None
    if any(_same(value, a) for a in (*rule.also, *rule.aliases)):
        return None
    if rule.checked_by is not None:
        return None
    bad = f"must be {rule.describe()}, got {_val(value)}"
    if rule.choices is not None:
        if not any(_same(value, c) for c in rule.choices):
            return bad
        missing = need(*rule.needs[value]) if value in (rule.needs or {}) else None
        return f"={value} {missing}" if missing else None
    if isinstance(value, (list, tuple)):
        return next((p for v in value if (p := problem(rule, v))), None)
    if isinstance(value, Mapping):
        for k, v in value.items():
            if rule.keys is not None and k not in rule.keys:
                return f".{k}: not an allowed key; use {list(rule.keys)}"
            if p := problem(rule, v):
                return f".{k} {p}"
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return bad
    if (rule.integer or rule.int_typed) and not isinstance(value, int):
        return bad
    if not math.isfinite(value):
        text = rule.describe()
        finite = text if text.startswith(("a finite", "an integer")) else f"a finite number {text}"
        return f"must be {finite}, got {value}"
    ok = (
        (rule.ge is None or value >= rule.ge)
        and (rule.gt is None or value > rule.gt)
        and (rule.le is None or value <= rule.le)
        and (rule.lt is None or value < rule.lt)
    )
    return None if ok else f"must be {rule.describe()}, got {_val(value)}"


def need(module: str, pip: str) -> str | None:
    """``needs the optional package X, not installed: pip install ...`` when ``module`` is missing."""
    if importlib.util.find_spec(module) is not None:
        return None
    return f"needs the optional package {module}, not installed: {pip}"


def _get(node: Any, path: str) -> tuple[bool, Any]:
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def check(cls: type, node: Mapping[str, Any], prefix: str = "") -> None:
    """Enforce every declaration of ``cls`` on the plain container ``node`` (the first offence is one
    :class:`UserError` line naming ``<prefix><dotted key>``, the value and the range)."""
    for path, rule, _ in declarations(cls):
        present, value = _get(node, path)
        if not present:
            continue
        p = problem(rule, value)
        if p:
            sep = "" if p.startswith(("=", ".")) else " "
            raise UserError(f"{prefix}{path}{sep}{p}")
