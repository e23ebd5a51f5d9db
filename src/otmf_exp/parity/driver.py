"""The parity driver: ``python -m otmf_exp.parity`` runs every case, prints the table, writes ``parity.json``.

For each case of :data:`MODULES` it runs ``ours`` here and saves ``WORK/<case>/ours.safetensors``,
then runs every case's ``theirs`` in one subprocess of the reference venv
(``REF_PYTHON -m otmf_exp.parity.reference.run``, ``PYTHONPATH`` = this package's ``src``), loads
``theirs.safetensors`` and diffs the two with :func:`otmf_exp.parity.core.diff`. Exit 1 when any
row fails, 2 on bad input. ``OTMF_PARITY_PERTURB=<case>:<factor>`` (tests only) scales one of our
tensors of that case before the diff, to prove a row can fail.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

from otmf_exp.errors import UserError, cli_main
from otmf_exp.parity import core
from otmf_exp.parity.core import Case, Row

log = logging.getLogger(__name__)

#: the family modules whose ``CASES`` make up ``make parity`` (one line to extend)
MODULES = ["task_arithmetic", "opcm", "dop", "fisher_regmean", "adamerging", "concrete", "wemoe", "finetune"]
#: the modules of ``make parity-authors`` (references that are not packages: OTMF's and MINGLE's code)
AUTHOR_MODULES = ["authors", "authors_adamerging", "authors_mingle", "authors_otmf"]
AUTHOR_REPOS = {
    "OTMF_REPO": "git clone https://github.com/37ETs/OT_fusion",
    "MINGLE_REPO": "git clone https://github.com/zihuanqiu/MINGLE",
}
SRC = Path(__file__).resolve().parents[2]  # the directory holding the otmf_exp package


def collect(modules: list[str]) -> list[Case]:
    """Every module's ``CASES`` in order; duplicate names are a :class:`UserError`."""
    cases: list[Case] = []
    for m in modules:
        try:
            module = importlib.import_module(f"otmf_exp.parity.{m}")
        except ModuleNotFoundError as e:
            if e.name != f"otmf_exp.parity.{m}":
                raise
            raise UserError(
                f"this checkout has no otmf_exp.parity.{m} (docs/parity.md lists the rows the package has)"
            ) from None
        cases += module.CASES
    names = [c.name for c in cases]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"duplicate parity case names: {', '.join(dup)}")
    return cases


def select(cases: list[Case], only: str | None) -> list[Case]:
    if not only:
        return cases
    want = [n.strip() for n in only.split(",") if n.strip()]
    known = {c.name for c in cases}
    unknown = [n for n in want if n not in known]
    if unknown:
        raise UserError(f"unknown parity case(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return [c for c in cases if c.name in want]


def run_ours(cases: list[Case], zoo: Path, work: Path) -> dict[str, tuple[str | None, float]]:
    """Our side of every case: ``{name: (error or None, seconds)}``; tensors saved beside."""
    from otmf_exp.parity.reference.zoo import save

    perturbed = core.perturbation(os.environ.get("OTMF_PARITY_PERTURB"))
    out = {}
    for c in cases:
        d = work / c.name
        d.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        try:
            tensors = c.ours(zoo, d)
            if perturbed and perturbed[0] == c.name:
                tensors = core.perturb(tensors, perturbed[1])
            save(tensors, d / "ours.safetensors")
            error = None
        except Exception as e:  # reported in the row, the other rows still run
            log.exception("ours failed for %s", c.name)
            error = f"ours failed: {type(e).__name__}: {e}"
        out[c.name] = (error, time.perf_counter() - t0)
        print(f"ours {c.name}: {out[c.name][1]:.1f} s", flush=True)
    return out


def run_theirs(cases: list[Case], zoo: Path, work: Path, python: str, env: dict[str, str]) -> float:
    """The reference side of every case, in one subprocess of ``python``; seconds taken."""
    cmd = [python, "-m", "otmf_exp.parity.reference.run", str(zoo), str(work)]
    cmd += [f"{c.name}={c.theirs}" for c in cases]
    path = os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])
    t0 = time.perf_counter()
    env = {**os.environ, **env, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    with open(work / "reference.log", "w") as logfile:  # FusionBench's chatter, kept for a failure
        proc = subprocess.run(cmd, env=env, stderr=logfile)  # its stdout: one line per case
    if proc.returncode != 0:
        tail = (work / "reference.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise UserError(f"the reference runner ({python}) exited {proc.returncode}: {tail[0]}")
    return time.perf_counter() - t0


def judge_all(cases: list[Case], work: Path, ours: dict[str, tuple[str | None, float]]) -> list[Row]:
    rows = []
    for c in cases:
        d, error = work / c.name, ours[c.name][0]
        if error is None and (d / "theirs.error").exists():
            error = "reference failed: " + (d / "theirs.error").read_text().strip().splitlines()[-1]
        result = None
        if error is None:
            result = core.diff(
                load_file(str(d / "ours.safetensors")), load_file(str(d / "theirs.safetensors"))
            )
        rows.append(core.judge(c, result, error))
    return rows


def check_python(python: str) -> None:
    if not Path(python).exists():
        raise UserError(f"no reference Python at {python}; run `make parity` (it creates .venv-parity)")


def report(rows: list[Row], provenance: dict, seconds: dict) -> dict:
    return {"provenance": provenance, "rows": [r.as_dict() for r in rows], "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    return cli_main(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m otmf_exp.parity", description=__doc__.splitlines()[0])
    p.add_argument("--python", default=".venv-parity/bin/python", help="the FusionBench venv's Python")
    p.add_argument("--cases", help="comma-separated case names (default: all)")
    p.add_argument("--json", type=Path, default=Path("parity.json"), help="where to write the report")
    p.add_argument("--work", type=Path, help="work directory (default: a temporary one, removed)")
    p.add_argument(
        "--authors", action="store_true", help="the rows against the authors' code (parity-authors)"
    )
    p.add_argument(
        "--check-repos", action="store_true", help="with --authors: only check OTMF_REPO / MINGLE_REPO"
    )
    p.add_argument("--md", type=Path, metavar="JSON", help="print JSON (a parity.json) as a Markdown table")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if a.md:
        if not a.md.exists():
            raise UserError(f"{a.md} does not exist; run `make parity` first")
        print(core.markdown(json.loads(a.md.read_text())["rows"]))
        return 0
    env = {}
    if a.authors:
        missing = [v for v in AUTHOR_REPOS if not os.environ.get(v) or not Path(os.environ[v]).is_dir()]
        if missing:
            how = "; ".join(f"{v}=DIR from `{AUTHOR_REPOS[v]}`" for v in missing)
            print(f"parity-authors needs clones of the authors' code: {how}")
            return 2
        env = {v: str(Path(os.environ[v]).resolve()) for v in AUTHOR_REPOS}
        if a.check_repos:
            return 0
    if a.authors and a.json == Path("parity.json"):
        a.json = Path("parity-authors.json")
    check_python(a.python)
    cases = select(collect(AUTHOR_MODULES if a.authors else MODULES), a.cases)
    with tempfile.TemporaryDirectory(prefix="otmf-parity-") as tmp:
        work = a.work or Path(tmp)
        return _run(cases, work, a, env)


def _run(cases: list[Case], work: Path, a: argparse.Namespace, env: dict[str, str]) -> int:
    import torch

    from otmf_exp.offline.zoo import DigitsZoo

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    zoo = DigitsZoo(progress=False)
    zoo_dir = zoo.export(work / "zoo", force=True)
    seconds = {"zoo_export": time.perf_counter() - t0}
    ours = run_ours(cases, zoo_dir, work)
    seconds["ours"] = sum(s for _, s in ours.values())
    seconds["reference"] = run_theirs(cases, zoo_dir, work, a.python, env)
    rows = judge_all(cases, work, ours)
    provenance = json.loads((work / "provenance.json").read_text())
    provenance = {
        "reference_packages": provenance,
        "ours": {"torch": torch.__version__.split("+")[0]},
        "zoo": {"hash": zoo.hash, "tasks": json.loads((zoo_dir / "config.json").read_text())["tasks"]},
        "command": "make parity-authors" if a.authors else "make parity",
    }
    print(core.table([r.as_dict() for r in rows]))
    if a.cases is None:  # a partial run never overwrites the full report
        a.json.write_text(json.dumps(report(rows, provenance, seconds), indent=1) + "\n")
        print(f"wrote {a.json}")
    return 0 if all(r.ok for r in rows) else 1
