"""The docs site's mkdocs hook: generated tables put in place of ``<!-- ... -->`` markers at build time.

Markers a page may hold (each on its own line):

* ``<!-- options: NAME -->``: the options of method ``NAME`` from its ``Config`` dataclass: dotted name,
  default, range or choices (``otmf_exp.schema``'s declarations) and the field's ``#:`` comment;
* ``<!-- methods -->``: every registered method (``otmf_exp.merging.METHODS``) with its protocols, its
  main coefficient, its state growth and its page; ``<!-- presets -->``: ``conf/method/`` files that are
  presets of another method; ``<!-- experiments -->``: ``conf/experiment/`` presets;
* ``<!-- parity-table -->``: every row of ``parity.json``; ``<!-- parity-pairs -->``: each float32 row
  beside its float64 twin; ``<!-- parity: NAME[,NAME] -->``: its rows of
  those methods; "not generated yet: run `make parity`" while the file is missing;
* ``<!-- published: NAME[,NAME] -->``: rows of ``otmf_exp/data/reference_numbers.csv`` for those
  reference method names, one column per method;
* ``<!-- benchmarks -->``: the tables of ``benchmarks.json`` (and ``benchmarks/*/benchmarks.json``),
  rendered by ``otmf_exp.benchmark.markdown``.

An unknown ``<!-- kind: arg -->`` (a typo) or an unregistered method name fails the build; a one-word
comment that is no marker stays as it is.

Every function below takes plain data and returns Markdown, so ``tests/test_docs.py`` runs them on
small fixtures; :func:`on_page_markdown` is the only mkdocs entry.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import re
import textwrap
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^<!--\s*([a-z-]+)\s*(?::\s*([\w,.-]+))?\s*-->\s*$", re.MULTILINE)
#: absolute paths of the machines results were measured on, kept out of the rendered pages
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|root|tmp|home|scratch)/[^\s`'\",;)]*")
#: the docs page of each method family (``merging/<family>/``)
FAMILY_PAGE = {
    "otmf": "otmf",
    "mingle": "mingle",
    "adamerging": "adamerging",
    "task_arithmetic": "task_arithmetic",
    "opcm": "opcm",
    "dop": "dop",
    "fisher_regmean": "fisher_regmean",
    "concrete": "concrete",
    "wemoe": "wemoe",
    "finetune": "finetune",
    "bounds": "bounds",
}


# ---- values ----------------------------------------------------------------------------------------
def _yaml(v: Any) -> str:
    """A default as it is written in a YAML override."""
    if isinstance(v, bool) or v is None:
        return {True: "true", False: "false", None: "null"}[v]
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_yaml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_yaml(x)}" for k, x in v.items()) + "}"
    return str(v)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def field_comments(cls: type) -> dict[str, str]:
    """``{field: text}`` of the ``#:`` comment lines right above each field of the class ``cls``."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = src.splitlines()
    out = {}
    for node in ast.parse(src).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above, i = [], node.lineno - 2
            while i >= 0 and lines[i].strip().startswith("#:"):
                above.insert(0, lines[i].strip()[2:].strip())
                i -= 1
            if above:
                out[node.target.id] = " ".join(above)
    return out


def option_rows(cls: type, prefix: str = "") -> list[dict[str, str]]:
    """One row per leaf field of the dataclass ``cls`` (nested dataclasses as dotted names)."""
    from otmf_exp.schema import declarations

    rules = {path: rule for path, rule, _ in declarations(cls)}
    return _rows(cls, prefix, rules, prefix)


def _rows(cls: type, prefix: str, rules: dict, root: str) -> list[dict[str, str]]:
    hints, comments, rows = typing.get_type_hints(cls), field_comments(cls), []
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(tp) and path[len(root) :] not in rules:
            rows.extend(_rows(tp, f"{path}.", rules, root))
            continue
        rule = rules.get(path[len(root) :])
        if rule is not None:
            accepts = rule.describe() if rule.checked_by is None else f"checked by `{rule.checked_by}`"
        elif tp is bool:
            accepts = "true or false"
        else:
            accepts = getattr(tp, "__name__", str(tp)).replace("typing.", "")
        rows.append(
            {"name": path, "default": _yaml(default), "accepts": accepts, "doc": comments.get(f.name, "")}
        )
    return rows


def options_table(cls: type, prefix: str = "method.") -> str:
    rows = [r for r in option_rows(cls, prefix) if r["name"] != f"{prefix}name"]
    out = ["| option | default | accepts | meaning |", "|---|---|---|---|"]
    out += [
        f"| `{r['name']}` | `{_cell(r['default'])}` | {_cell(r['accepts'])} | {_cell(r['doc']) or '—'} |"
        for r in rows
    ]
    return "\n".join(out)


# ---- registry and presets -----------------------------------------------------------------------------
def family(cls: type) -> str:
    return cls.__module__.split(".")[2]


def methods_table(methods: dict[str, type], link_prefix: str = "") -> str:
    out = ["| method | family (page) | protocols | `alpha=` sets | carried state |", "|---|---|---|---|---|"]
    for name, cls in methods.items():
        fam = family(cls)
        page = f"[{fam}]({link_prefix}{FAMILY_PAGE.get(fam, fam)}.md)"
        coef = f"`method.{cls.main_coef}`" if cls.main_coef else "— (refused)"
        growth = "grows per task" if cls.state_growth == "per_task" else "constant"
        out.append(f"| `{name}` | {page} | {', '.join(cls.protocols)} | {coef} | {growth} |")
    return "\n".join(out)


def _yaml_header(text: str) -> str:
    """The leading comment block of a YAML file as one sentence-ish line."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line.lstrip("#").strip()
        if body and not body.startswith("@package"):
            lines.append(body)
    return " ".join(lines)


def presets_table(conf_method: Path, methods: dict[str, type]) -> str:
    out = ["| preset | of method | sets | what it is |", "|---|---|---|---|"]
    for path in sorted(conf_method.glob("*.yaml")):
        if path.stem in methods:
            continue
        text = path.read_text()
        base = re.search(r"/schema/method/(\w+)@", text)
        sets = [
            ln.strip() for ln in text.splitlines() if re.match(r"^[a-z_]\w*\s*:", ln) and ln[:8] != "defaults"
        ]
        base_name = base.group(1) if base else "?"
        out.append(
            f"| `method={path.stem}` | `{base_name}` | {_cell(', '.join(f'`{s}`' for s in sets)) or '—'} | "
            f"{_cell(_yaml_header(text))} |"
        )
    return "\n".join(out)


def experiments_table(conf_experiment: Path) -> str:
    out = ["| `experiment=` | what it runs |", "|---|---|"]
    for path in sorted(conf_experiment.rglob("*.yaml")):
        name = path.relative_to(conf_experiment).with_suffix("").as_posix()
        out.append(f"| `{name}` | {_cell(_yaml_header(path.read_text()))} |")
    return "\n".join(out)


# ---- parity, published numbers, benchmarks ---------------------------------------------------------------
PARITY_MISSING = "*Not generated yet: run `make parity` (it writes `parity.json` at the repository root).*"
PARITY_COLUMNS = (
    "name",
    "method",
    "settings",
    "reference",
    "compared",
    "max_abs_diff",
    "bound",
    "ok",
    "dtype",
)


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return _yaml(v) if v is None or isinstance(v, (bool, list, dict)) else str(v)


def parity_table(data: dict | None, methods: set[str] | None = None) -> str:
    """The rows of ``parity.json`` (all, or those whose ``method`` is in ``methods``)."""
    if data is None:
        return PARITY_MISSING
    rows = [r for r in data.get("rows", []) if methods is None or r.get("method") in methods]
    if not rows:
        return "*No row of `parity.json` compares this method.*"
    out = ["| " + " | ".join(PARITY_COLUMNS) + " |", "|" + "---|" * len(PARITY_COLUMNS)]
    for r in rows:
        cells = [_num(r.get(c)) for c in PARITY_COLUMNS]
        cells[PARITY_COLUMNS.index("ok")] = "yes" if r.get("ok") else "**no**"
        out.append("| " + " | ".join(_cell(scrub(c)) for c in cells) + " |")
    notes = [f"- `{r['name']}`: {_cell(scrub(str(r['why'])))}" for r in rows if r.get("why")]
    return "\n".join(out + ([""] + notes if notes else []))


def parity_pairs(data: dict | None) -> str:
    """Each float32 row of ``parity.json`` beside its float64 twin (the row named ``<name>_f64``): the
    rounding its bound allows, and the agreement that shows the semantics are the same."""
    if data is None:
        return PARITY_MISSING
    rows = {r["name"]: r for r in data.get("rows", [])}
    out = [
        "| row | method | float32 max \\|Δ\\| | float32 bound | float64 max \\|Δ\\| |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        if r.get("dtype", "float32") == "float32":
            twin = rows.get(f"{name}_f64")
            f64 = _num(twin["max_abs_diff"]) if twin else "no float64 row"
            out.append(
                f"| `{name}` | {r.get('method')} | {_num(r.get('max_abs_diff'))} | {_num(r.get('bound'))} | {f64} |"
            )
    return "\n".join(out) + "\n"


def published_table(csv: Path, names: list[str]) -> str:
    """Published numbers of the reference methods ``names``: one row per (source, protocol, backbone,
    tasks, metric), one column per method (value ± std)."""
    import pandas as pd

    df = pd.read_csv(csv)
    df = df[df["method"].isin(names)]
    if df.empty:
        return "*No published number in `reference_numbers.csv` for this method.*"
    df = df.assign(cell=[f"{v:g}" + (f" ± {s:g}" if s == s else "") for v, s in zip(df["value"], df["std"])])
    keys = ["source", "protocol", "backbone", "task_seq", "metric"]
    wide = df.pivot_table(index=keys, columns="method", values="cell", aggfunc="first", sort=False)
    cols = [n for n in names if n in wide.columns]
    out = ["| " + " | ".join([*keys, *cols]) + " |", "|" + "---|" * (len(keys) + len(cols))]
    for idx, row in wide.iterrows():
        cells = [*idx, *(row[c] if isinstance(row[c], str) else "" for c in cols)]
        out.append("| " + " | ".join(_cell(str(c)) for c in cells) + " |")
    return "\n".join(out)


def scrub(text: str) -> str:
    """Absolute paths of the measuring machines (see :data:`MACHINE_PATH`) replaced by ``<path>``."""
    return MACHINE_PATH.sub("<path>", text)


def benchmarks_section(root: Path) -> str:
    from otmf_exp.benchmark.markdown import render
    from otmf_exp.benchmark.report import summarise
    from otmf_exp.benchmark.suite import model_mb

    main = root / "benchmarks.json"
    if not main.is_file():
        return "*Not generated yet: run `make bench` (it writes `benchmarks.json`).*"
    others = {}
    for path in sorted(root.glob("benchmarks/*/benchmarks.json")):  # as scripts/bench.py renders them
        other = json.loads(path.read_text())
        other["summary"] = summarise(other)
        other.setdefault("model_mb", model_mb(other))
        others[path.parent.name] = other
    text = render(json.loads(main.read_text()), others)
    # one heading level down (the page has its own title), machine paths out
    return scrub("\n".join("#" + ln if ln.startswith("#") else ln for ln in text.splitlines()))


# ---- the mkdocs entry --------------------------------------------------------------------------------
def _load_parity(root: Path) -> dict | None:
    """``parity.json``'s rows, then those of ``parity-authors.json`` (``make parity-authors``) when it is there."""
    path = root / "parity.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    authors = root / "parity-authors.json"
    if authors.is_file():
        data = {**data, "rows": [*data.get("rows", []), *json.loads(authors.read_text()).get("rows", [])]}
    return data


def expand(markdown: str, root: Path = ROOT, page: str = "") -> str:
    """``markdown`` with every marker replaced by its generated table."""
    from otmf_exp.merging import METHODS

    def parity(arg: str | None) -> str:
        return parity_table(_load_parity(root), set(arg.split(",")) if arg else None)

    link = "" if page.startswith("methods/") else "methods/"
    makers: dict[str, Callable[[str | None], str]] = {
        "options": lambda arg: options_table(METHODS[arg].Config),
        "methods": lambda arg: methods_table(METHODS, link),
        "presets": lambda arg: presets_table(root / "conf" / "method", METHODS),
        "experiments": lambda arg: experiments_table(root / "conf" / "experiment"),
        "parity-table": parity,
        "parity": parity,
        "parity-pairs": lambda arg: parity_pairs(_load_parity(root)),
        "published": lambda arg: published_table(
            root / "src" / "otmf_exp" / "data" / "reference_numbers.csv", (arg or "").split(",")
        ),
        "benchmarks": lambda arg: benchmarks_section(root),
    }

    def replace(m: re.Match) -> str:
        kind, arg = m.group(1), m.group(2)
        if kind not in makers:
            if arg is None:  # a plain one-word HTML comment (another page's own note) stays as it is
                return m.group(0)
            raise ValueError(f"{page}: unknown docs marker <!-- {kind}: {arg} -->; known: {sorted(makers)}")
        if kind == "options" and arg not in METHODS:
            raise ValueError(f"{page}: <!-- options: {arg} --> names no registered method")
        return makers[kind](arg)

    return MARKER.sub(replace, markdown)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """mkdocs hook: expand the markers of every page."""
    return expand(markdown, ROOT, page.file.src_uri)
