"""A sweep's record of failed jobs (``<sweep dir>/failed_jobs.jsonl``) and the lines that report it.

Jobs may run in other processes (joblib, SLURM), so a failed job appends one JSON line to a file
in the sweep directory (``O_APPEND``: concurrent jobs never interleave within a line) and the
sweep's own process reads it at the end. The file is removed when a sweep starts.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

LEDGER = "failed_jobs.jsonl"


def ledger(sweep_dir: str | Path) -> Path:
    return Path(sweep_dir) / LEDGER


def reset(sweep_dir: str | Path) -> None:
    """Forget the failures of an earlier sweep into the same directory."""
    ledger(sweep_dir).unlink(missing_ok=True)


def record_failure(sweep_dir: str | Path, job: int, overrides: list[str], error: str, kind: str) -> None:
    """Append one failed job: its number, overrides, one-line error and kind (``UserError`` or the
    exception type of a crash)."""
    path = ledger(sweep_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"job": job, "overrides": overrides, "error": error, "kind": kind}) + "\n"
    from otmf_exp.runtime.files import open_nofollow

    fd = open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def failures(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """The failed jobs recorded so far, by job number."""
    path = ledger(sweep_dir)
    if not path.exists():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return sorted(rows, key=lambda r: r["job"])


def repeated(sweep_dir: str | Path, error: str) -> bool:
    """True when an earlier job of this sweep already failed with exactly ``error`` (a missing hub
    id offline fails every job the same way: its ``error:`` line is printed once, not per job)."""
    return any(r["error"] == error for r in failures(sweep_dir))


def report(sweep_dir: str | Path, rows: list[dict[str, Any]], show: int = 5) -> list[str]:
    """The lines printed at the end of a sweep with failed jobs: one per job, except that jobs
    failing with the same error share one line with their count (and the first ``show`` numbers)."""
    out = [f"sweep finished with {len(rows)} failed job(s) (listed in {ledger(sweep_dir)}):"]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["error"], []).append(r)
    for error, same in groups.items():
        if len(same) == 1:
            r = same[0]
            out.append(f"  job #{r['job']} [{' '.join(map(shlex.quote, r['overrides']))}]: {error}")
            continue
        nums = ", ".join(f"#{r['job']}" for r in same[:show]) + (", ..." if len(same) > show else "")
        out.append(f"  {len(same)} jobs ({nums}): {error}")
    return out


def exit_code(rows: list[dict[str, Any]]) -> int:
    """2 when every failure was bad input (``UserError``), 1 when a job crashed."""
    return 2 if all(r["kind"] == "UserError" for r in rows) else 1


def plan_jobs(overrides: list[str]) -> list[list[str]]:
    """Every job of ``python -m otmf_exp.run -m <overrides>``, as Hydra's basic sweeper would
    launch them: the preset's ``hydra.sweeper.params`` first, the command line's values replacing
    them key by key, then the cartesian product. Nothing is run or written."""
    from hydra import compose, initialize_config_module
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    with initialize_config_module(config_module="otmf_exp.conf", version_base="1.3"):
        cfg = compose(config_name="run", overrides=fixed, return_hydra_config=True)
    node = cfg.hydra.sweeper.get("params")
    params = OmegaConf.to_container(node, resolve=False) if node is not None else {}
    lines = [f"{k}={v}" for k, v in params.items()] + list(overrides)
    (jobs,) = BasicSweeper.split_arguments(parser.parse_overrides(lines), None)
    # every swept value composes (an unknown choice or key fails here, not hours into the sweep):
    # one composition per distinct value, the other keys at the first job's values
    seen: set[str] = set()
    with initialize_config_module(config_module="otmf_exp.conf", version_base="1.3"):
        for job in jobs:
            new = [o for o in job if o not in seen]
            if new:
                seen.update(new)
                compose(config_name="run", overrides=job)
    return jobs


def dry_run_lines(overrides: list[str], show: int | None = None) -> list[str]:
    """``N jobs`` then one line per job (``#i key=value ...``); ``show`` limits the listed jobs."""
    jobs = plan_jobs(overrides)
    out = [f"{len(jobs)} jobs (python -m otmf_exp.run -m {' '.join(overrides)})"]
    for i, job in enumerate(jobs[:show] if show else jobs):
        out.append(f"#{i} " + " ".join(job))
    if show and len(jobs) > show:
        out.append(f"... {len(jobs) - show} more (--dry-run=all lists every job)")
    return out


# ---- SLURM requeue (hydra-submitit-launcher) ----------------------------------------------------
def requeued(out_dir: str | Path) -> bool:
    """True for a job that submitit restarted after a timeout or preemption: its ``checkpoint()``
    resubmits the same job into the same job dir, which then holds this job's own checkpoint. Such
    a job continues with ``resume=true`` semantics (a checkpoint of another config is still the
    resume check's one-line error). Outside submitit (``SUBMITIT_EXECUTOR`` unset) always False."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return False
    from otmf_exp.errors import UserError
    from otmf_exp.runtime import checkpoint

    try:
        return checkpoint.latest_doc(Path(out_dir)) is not None
    except UserError:  # a broken checkpoint: resume=true reports it in one line
        return True


def mark_requeued(out_dir: str | Path) -> None:
    """Record in ``metrics.json`` that this run was requeued and resumed from its checkpoint."""
    from otmf_exp.runtime import files

    path = Path(out_dir) / "metrics.json"
    doc = json.loads(path.read_text())
    try:
        import submitit

        job: str | None = submitit.JobEnvironment().job_id
    except Exception:  # not inside a submitit job (e.g. a test calling this directly)
        job = None
    doc["requeued"] = {"resumed": True, "job_id": job}
    files.write_json(path, doc)


#: where an ``append`` sweep records the number of its first job dir (jobs may run in other processes)
OFFSET = ".otmf_append_offset"


def existing_jobs(sweep_dir: str | Path) -> list[Path]:
    """The job dirs of an earlier sweep in ``sweep_dir``: subdirs holding a complete result set
    (``runtime/results.py``: its ``metrics.json``)."""
    from otmf_exp.runtime.results import COMPLETE

    root = Path(sweep_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and (p / COMPLETE).is_file())


def check_existing(sweep_dir: str | Path, mode: str) -> None:
    """Before any job runs: refuse a sweep dir that holds results (``mode=refuse``, one line); for
    ``append`` keep the old ``multirun.yaml`` as ``multirun.N.yaml`` and record the first free job
    number (:data:`OFFSET`); ``resume`` runs the same jobs with ``resume=true``."""
    from otmf_exp.errors import UserError

    root = Path(sweep_dir)
    if not root.is_dir():  # a new sweep dir (or one that cannot be made: Hydra says so in one line)
        return
    (root / OFFSET).unlink(missing_ok=True)
    jobs, conf = existing_jobs(root), root / "multirun.yaml"
    if not jobs and not conf.exists():
        return
    if mode == "refuse":
        raise UserError(
            f"sweep dir {root} already holds results ({len(jobs)} job dir(s) with metrics.json"
            f"{', multirun.yaml' if conf.exists() else ''}); pass sweep_existing=append (new job dirs) or "
            "sweep_existing=resume (the same jobs), or choose another hydra.sweep.dir"
        )
    if mode == "append":
        nums = [
            int(p.name.split("_")[0]) for p in root.iterdir() if p.is_dir() and p.name.split("_")[0].isdigit()
        ]
        if conf.exists():
            n = 1
            while (root / f"multirun.{n}.yaml").exists():
                n += 1
            os.replace(conf, root / f"multirun.{n}.yaml")
        from otmf_exp.runtime import files

        files.write_text(root / OFFSET, str(max(nums, default=-1) + 1))  # the one no-follow writer


def append_dir(sweep_dir: str | Path, job_dir: Path, num: int) -> Path:
    """An ``append`` sweep's job dir: ``job_dir`` with its leading job number moved past the
    existing ones (``<num>_...`` -> ``<num + offset>_...``); unchanged without an offset."""
    try:
        offset = int((Path(sweep_dir) / OFFSET).read_text())
    except (OSError, ValueError):
        return job_dir
    head, sep, tail = job_dir.name.partition("_")
    if head != str(num):
        raise ValueError(f"hydra.sweep.subdir {job_dir.name!r} does not start with the job number")
    return job_dir.with_name(f"{num + offset}{sep}{tail}")


def compose_argv(argv: list[str]) -> Any:
    """The config (``hydra`` node included) that ``python -m otmf_exp.run -m <argv>`` composes for its
    first job, read the way Hydra reads argv: its own argument parser (every flag form,
    ``--config-dir DIR`` / ``--config-dir=DIR``, ``--config-name``, ``-cp``), the extra config dir
    prepended to the search path as Hydra does, swept values left to the sweeper. A bad override,
    a missing config dir, a preset that is not valid YAML raise (one line for the caller)."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path, get_args_parser
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    args, _ = get_args_parser().parse_known_args(argv)
    parsed = OverridesParser.create().parse_overrides(args.overrides)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    search_path = create_config_search_path(args.config_path or "pkg://otmf_exp.conf")
    if args.config_dir is not None:
        where = os.path.abspath(args.config_dir)
        if not os.path.isdir(where):
            raise FileNotFoundError(f"--config-dir {where} is not a directory")
        search_path.prepend(
            provider="command-line", path=f"file://{where}", anchor=SearchPathQuery(provider="schema")
        )
    GlobalHydra.instance().clear()
    try:
        hydra = Hydra.create_main_hydra2(task_name="run", config_search_path=search_path)
        return hydra.compose_config(
            args.config_name or "run", fixed, run_mode=RunMode.MULTIRUN, with_log_configuration=False
        )
    finally:
        GlobalHydra.instance().clear()


def check_sweep_dir(argv: list[str]) -> None:
    """:func:`check_existing` for ``python -m otmf_exp.run -m <argv>`` (Hydra's callbacks swallow
    exceptions, so this runs before Hydra starts); the config is composed as Hydra will
    (:func:`compose_argv`), and one that does not compose is one :class:`UserError` line here. A
    sweep dir that needs Hydra's runtime to resolve (the default ``multirun/<date>/<time>``) is new
    by construction and skipped."""
    from omegaconf.errors import InterpolationResolutionError

    from otmf_exp.errors import UserError, is_config_error, one_line

    try:
        cfg = compose_argv(argv)
    except Exception as e:
        if is_config_error(e) or isinstance(e, OSError):
            raise UserError(one_line(e)) from None
        raise
    try:
        sweep_dir = str(cfg.hydra.sweep.dir)
    except InterpolationResolutionError:  # needs Hydra's runtime: a new dir
        return
    check_existing(sweep_dir, str(cfg.get("sweep_existing", "refuse")))
