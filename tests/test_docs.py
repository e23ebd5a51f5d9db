"""The docs site: the build-time generators of docs/hooks.py on fixtures, the pages' markers and links,
and the one-screen README that links into the site (the strict build itself is `make docs-build`)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from otmf_exp.merging import METHODS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
MACHINE = re.compile(r"(?<![\w.])/(?:work|root|tmp|home)/")


@pytest.fixture(scope="module")
def hooks():
    spec = importlib.util.spec_from_file_location("otmf_docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _nav_pages() -> set[str]:
    text = (ROOT / "mkdocs.yml").read_text().split("\nnav:", 1)[1]
    return set(re.findall(r":\s*([\w/.-]+\.md)\s*$", text, re.MULTILINE))


# ---- the generated option tables --------------------------------------------------------------------
def _leaves(cls: type, prefix: str = "") -> list[str]:
    from otmf_exp.schema import declarations

    declared = {p for p, _, _ in declarations(cls)}
    out = []
    for f in dataclasses.fields(cls):
        tp = cls.__annotations__.get(f.name)
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default) and f"{prefix}{f.name}" not in declared:
            out += _leaves(type(default), f"{prefix}{f.name}.")
        elif tp is not None:
            out.append(f"{prefix}{f.name}")
    return out


@pytest.mark.parametrize("name", sorted(METHODS))
def test_options_table_has_every_field_of_the_schema(hooks, name):
    cls = METHODS[name].Config
    table = hooks.options_table(cls)
    rows = [ln for ln in table.splitlines()[2:]]
    names = [re.match(r"^\| `method\.([^`]+)`", ln).group(1) for ln in rows]
    assert names == [n for n in _leaves(cls) if n != "name"]


def test_options_table_reads_defaults_ranges_choices_and_comments(hooks):
    table = hooks.options_table(METHODS["ties"].Config)
    assert (
        "| `method.density` | `0.2` | in (0, 1] | fraction of entries kept by the trim step, in (0, 1] |"
        in table
    )
    assert "| `method.scaling` | `null` | >= 0 or null | λ; null = the protocol default" in table
    assert "| `method.merge` | `sum` | one of ['sum', 'mean', 'max'] |" in table
    otmf = hooks.options_table(METHODS["otmf"].Config)
    assert "| `method.sinkhorn.blur` | `0.05` | > 0 |" in otmf  # nested dataclasses: dotted names
    assert "| `method.head_tuning.enabled` | `true` | true or false |" in otmf


def test_a_new_field_appears_without_editing_the_docs(hooks, tmp_path, monkeypatch):
    src = '''
    """A schema with a field the docs have never seen."""
    from dataclasses import dataclass, field

    from otmf_exp.schema import choice, num


    @dataclass
    class Inner:
        #: how deep
        depth: int = num(3, ge=1)


    @dataclass
    class NewConfig:
        name: str = "new"
        #: a brand-new coefficient,
        #: explained on two comment lines
        gamma: float = num(0.25, gt=0, le=1)
        mode: str = choice("a", ("a", "b"))
        inner: Inner = field(default_factory=Inner)
    '''
    (tmp_path / "new_schema.py").write_text(textwrap.dedent(src))
    spec = importlib.util.spec_from_file_location("new_schema", tmp_path / "new_schema.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "new_schema", module)
    spec.loader.exec_module(module)
    table = hooks.options_table(module.NewConfig)
    assert (
        "| `method.gamma` | `0.25` | in (0, 1] | a brand-new coefficient, explained on two comment lines |"
        in table
    )
    assert "| `method.mode` | `a` | one of ['a', 'b'] | — |" in table
    assert "| `method.inner.depth` | `3` | >= 1 | how deep |" in table  # nested: a dotted name


# ---- parity, published numbers, registry ------------------------------------------------------------
PARITY = {
    "rows": [
        {
            "name": "ties_joint",
            "method": "ties",
            "settings": "density=0.2",
            "reference": "FusionBench 0.2.33",
            "compared": "merged weights",
            "max_abs_diff": 1.5e-7,
            "bound": 1e-6,
            "why": "float32 summation order (run in /work/fb)",
            "ok": True,
            "dtype": "float32",
        },
        {
            "name": "opcm_steps",
            "method": "opcm",
            "settings": "alpha=0.5",
            "reference": "FusionBench OPCMForCLIP",
            "compared": "merged weights",
            "max_abs_diff": 3e-5,
            "bound": 1e-5,
            "why": "",
            "ok": False,
            "dtype": "float64",
        },
    ],
    "code_version": "abc",
}


def test_parity_table_all_rows_and_per_method(hooks):
    full = hooks.parity_table(PARITY)
    assert full.count("\n| ") == 2 and "ties_joint" in full and "opcm_steps" in full
    assert "| 1.5e-07 | 1e-06 | yes |" in full and "| 3e-05 | 1e-05 | **no** |" in full
    assert "/work/" not in full and "<path>" in full  # a machine path in `why` is scrubbed
    ties = hooks.parity_table(PARITY, {"ties"})
    assert "ties_joint" in ties and "opcm_steps" not in ties
    assert "No row" in hooks.parity_table(PARITY, {"dop"})


def test_parity_missing_file_renders_a_note_and_marker_expands(hooks, tmp_path):
    assert hooks.parity_table(None) == hooks.PARITY_MISSING and "make parity" in hooks.PARITY_MISSING
    assert hooks.expand("a\n<!-- parity: ties -->\nb", tmp_path) == f"a\n{hooks.PARITY_MISSING}\nb"
    (tmp_path / "parity.json").write_text(json.dumps(PARITY))
    out = hooks.expand("<!-- parity-table -->", tmp_path)
    assert "ties_joint" in out and "opcm_steps" in out


def test_published_table_pivots_the_reference_numbers(hooks, tmp_path):
    csv = tmp_path / "ref.csv"
    csv.write_text(
        "source,protocol,backbone,task_seq,method,metric,value,std,note\n"
        "p,continual,b32,vit8,otmf,acc,79.7,,x\n"
        "p,continual,b32,vit8,otmf_no_masks,acc,64.0,1.5,x\n"
        "q,joint,b32,vit8,ties,acc,70.0,,x\n"
    )
    out = hooks.published_table(csv, ["otmf", "otmf_no_masks"])
    assert (
        out.splitlines()[0] == "| source | protocol | backbone | task_seq | metric | otmf | otmf_no_masks |"
    )
    assert "| p | continual | b32 | vit8 | acc | 79.7 | 64 ± 1.5 |" in out and "ties" not in out
    assert "No published number" in hooks.published_table(csv, ["dop"])


def test_methods_table_lists_the_registry_with_existing_pages(hooks):
    table = hooks.methods_table(METHODS, "methods/")
    for name, cls in METHODS.items():
        assert f"| `{name}` |" in table
        assert (DOCS / "methods" / f"{hooks.FAMILY_PAGE[hooks.family(cls)]}.md").is_file()
    presets = hooks.presets_table(ROOT / "conf" / "method", METHODS)
    assert "`method=c_adamerging` | `adamerging` |" in presets and "`method=ties`" not in presets


def test_unknown_markers_fail_the_build(hooks):
    with pytest.raises(ValueError, match="unknown docs marker"):
        hooks.expand("<!-- option: ties -->")  # a typo of `options`
    assert hooks.expand("<!-- note -->") == "<!-- note -->"  # a one-word comment is no marker
    with pytest.raises(ValueError, match="names no registered method"):
        hooks.expand("<!-- options: nope -->")


# ---- the pages ------------------------------------------------------------------------------------
def test_every_page_expands_and_every_family_has_a_page_in_the_nav(hooks):
    nav = _nav_pages()
    for page in PAGES:
        rel = page.relative_to(DOCS).as_posix()
        assert rel in nav, f"{rel} is not in mkdocs.yml's nav"
        hooks.expand(page.read_text(), ROOT, rel)
    families = {hooks.family(cls) for cls in METHODS.values()}
    for fam in families:
        page = f"methods/{hooks.FAMILY_PAGE[fam]}.md"
        assert page in nav
        text = (DOCS / page).read_text()
        names = [n for n, c in METHODS.items() if hooks.family(c) == fam]
        for n in names:
            assert f"<!-- options: {n} -->" in text, (page, n)


def test_no_machine_paths_in_docs_readme_or_mkdocs_yml():
    for path in [*PAGES, ROOT / "README.md", ROOT / "mkdocs.yml", DOCS / "hooks.py"]:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            assert not MACHINE.search(line), f"{path.relative_to(ROOT)}:{i}: {line.strip()[:80]}"


def test_mkdocs_yml_names_the_hook_and_the_pinned_extra():
    cfg = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)  # !!python tags as text
    assert cfg["hooks"] == ["docs/hooks.py"] and cfg["strict"] == "true"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^docs = \["mkdocs==[\d.]+", "mkdocs-material==[\d.]+"\]$', pyproject, re.MULTILINE)


def test_figures_exist():
    for name in ("heatmap_otmf", "forgetting_otmf", "heatmap_task_arithmetic", "forgetting_task_arithmetic"):
        data = (DOCS / "figures" / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000


# ---- README ---------------------------------------------------------------------------------------
def test_readme_is_one_screen_and_links_into_the_site():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert links and all((ROOT / link).is_file() for link in links), [
        x for x in links if not (ROOT / x).is_file()
    ]
    for name in METHODS:  # the table of methods: one line each, linking to its page
        line = next((ln for ln in text.splitlines() if ln.startswith("| ") and f"`{name}`" in ln), None)
        assert line is not None and "](docs/methods/" in line, name
    assert "make demo" in text and "make test" in text
    block = text.split("## Five example commands", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    assert len([ln for ln in block.splitlines() if ln.strip()]) == 5


def test_pages_named_in_code_and_configs_exist():
    """A docstring, YAML comment or error message that sends the reader to docs/<page>.md names a page."""
    named = re.compile(r"\bdocs/([\w/-]+\.md)")
    missing = []
    for path in [
        *(ROOT / "src").rglob("*.py"),
        *(ROOT / "conf").rglob("*.yaml"),
        *(ROOT / "scripts").rglob("*.py"),
    ]:
        for page in named.findall(path.read_text()):
            if not (DOCS / page).is_file():
                missing.append(f"{path.relative_to(ROOT)}: docs/{page}")
    assert missing == []


def test_parity_rows_of_the_authors_file_join_the_table_when_it_is_there(hooks, tmp_path):
    row = {"name": "a", "method": "consensus", "settings": "s", "reference": "r", "compared": "c"}
    row |= {"max_abs_diff": 1e-7, "bound": 1e-6, "ok": True, "dtype": "float32", "why": "w"}
    (tmp_path / "parity.json").write_text(json.dumps({"rows": [row]}))
    assert len(hooks._load_parity(tmp_path)["rows"]) == 1
    (tmp_path / "parity-authors.json").write_text(
        json.dumps({"rows": [row | {"name": "b", "reference": "MINGLE"}]})
    )
    table = hooks.parity_table(hooks._load_parity(tmp_path), {"consensus"})
    assert "| a |" in table and "| b |" in table and "MINGLE" in table
