"""Hydra entry point: compose -> run_experiment -> metrics dict; one line for every way a run ends badly.

python -m otmf_exp.run                              # offline digits8 suite
python -m otmf_exp.run task_seq=vit8 alpha=0.8      # ViT-B/32 on TA8 (needs the hub)
python -m otmf_exp.run -m method=averaging,task_arithmetic
python -m otmf_exp.run -m experiment=paper/continual_vision --dry-run   # list the 900 jobs, run none

* bad input: ``error: <one line>`` on stderr, exit code 2;
* Ctrl-C: one line with the command that resumes the run, exit code 130;
* multirun (``-m``): a failing job is reported and recorded, the other jobs still run; the sweep
  ends with the list of failed jobs (``<sweep dir>/failed_jobs.jsonl``) and a non-zero exit code
  (:class:`SweepReport`, registered in ``conf/run.yaml`` under ``hydra.callbacks``).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import threading


def _interrupted_while_starting(signum: int, frame: object) -> None:
    """Ctrl-C while the heavy modules (torch, Hydra) are imported: one line, exit 130, nothing written."""
    os.write(2, b"interrupted while starting up; nothing was run or written\n")
    os._exit(130)


_MAIN = threading.current_thread() is threading.main_thread()
_BEFORE = signal.signal(signal.SIGINT, _interrupted_while_starting) if _MAIN else None
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.experimental.callback import Callback  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402

from otmf_exp.config import check_registry, register_configs  # noqa: E402
from otmf_exp.errors import (  # noqa: E402
    EXIT_USER_ERROR,
    RunInterrupted,
    UserError,
    cli_main,
    is_config_error,
    one_line,
    watch_interrupts,
)
from otmf_exp.reporting.summary import print_summary  # noqa: E402
from otmf_exp.runner import run_experiment  # noqa: E402
from otmf_exp.runtime import sweep  # noqa: E402

log = logging.getLogger("otmf_exp")
register_configs()
if _MAIN:  # imports done: Ctrl-C is handled by cli_main / watch_interrupts again
    signal.signal(signal.SIGINT, _BEFORE)

#: the job running now, for the Ctrl-C line: its overrides
_CURRENT: dict[str, Any] = {}


def _out_dir(cfg: DictConfig) -> Path:
    if cfg.out_dir:
        return Path(cfg.out_dir)
    return Path(HydraConfig.get().runtime.output_dir)


def _drop_if_empty(path: Path) -> None:
    """Remove a run dir Hydra created for a run that failed before writing anything."""
    try:
        path.rmdir()  # only succeeds when empty
    except OSError:
        pass


def concurrent_jobs(hc: Any) -> int:
    """Jobs a sweep's launcher runs at once (joblib ``n_jobs``; -1 = one per CPU), else 1."""
    from otmf_exp.runtime.session import available_cpus

    n = hc.launcher.get("n_jobs") if "launcher" in hc else None
    if not isinstance(n, int) or n == 0:
        return 1
    return available_cpus() if n < 0 else n


@hydra.main(version_base="1.3", config_path="pkg://otmf_exp.conf", config_name="run")
def _main(cfg: DictConfig) -> Any:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    # the override strings as typed: iterating the ListConfig would resolve an `x=${...}` override
    overrides = [str(o) for o in OmegaConf.to_container(hc.overrides.task, resolve=False)]
    _CURRENT["overrides"] = overrides
    job_dir = Path(hc.runtime.output_dir)
    try:
        if multirun and cfg.out_dir and hc.job.num > 0:
            raise UserError(
                f"out_dir={cfg.out_dir} would be shared by every job of this sweep; drop out_dir "
                "(each job gets <sweep dir>/<job>) or run that job alone"
            )
        out_dir = _out_dir(cfg)
        if multirun and not cfg.out_dir and cfg.sweep_existing == "append":  # numbered after the old jobs
            out_dir = sweep.append_dir(hc.sweep.dir, job_dir, int(hc.job.num))
            _drop_if_empty(job_dir)  # the dir Hydra made for this number (empty unless an old job's)
            job_dir = out_dir
        if multirun and cfg.sweep_existing == "resume":
            with open_dict(cfg):
                cfg.resume = True
        requeue = multirun and not cfg.resume and sweep.requeued(out_dir)  # SLURM requeue
        if requeue:
            log.warning("job #%s was requeued: resuming from its checkpoint in %s", hc.job.num, out_dir)
            cfg.resume = True
        result = run_experiment(cfg, out_dir, concurrent_jobs(hc) if multirun else 1)
        if requeue:
            sweep.mark_requeued(out_dir)
    except Exception as e:
        if not isinstance(e, (UserError, OSError)) and not is_config_error(e):
            if not multirun:
                raise  # a crash in a single run is a bug: its traceback, exit 1
            log.exception("job #%s crashed", hc.job.num)  # a crash in one job must not end the sweep
            first = (str(e).splitlines() or [""])[0]
            sweep.record_failure(
                hc.sweep.dir, int(hc.job.num), overrides, f"{type(e).__name__}: {first}", type(e).__name__
            )
            return None
        # bad input, a config error, or the environment (ENOSPC, EACCES, EROFS anywhere in a run)
        line = str(e) if isinstance(e, UserError) else os_error(e) if isinstance(e, OSError) else one_line(e)
        if not (multirun and sweep.repeated(hc.sweep.dir, line)):  # the same error: printed once
            print(f"error: job #{hc.job.num}: {line}" if multirun else f"error: {line}", file=sys.stderr)
        if not cfg.out_dir or multirun:
            _drop_if_empty(job_dir)
        if not multirun:
            sys.exit(EXIT_USER_ERROR)
        sweep.record_failure(hc.sweep.dir, int(hc.job.num), overrides, line, "UserError")
        return None
    finally:
        if multirun and cfg.out_dir:
            _drop_if_empty(job_dir)  # the sweep's job dir, unused when out_dir was given
    show_summary(result, out_dir.resolve())
    return result["acc"]


def os_error(e: OSError) -> str:
    """One line for an OSError a run met (a full disk, a read-only or unwritable dir): the file,
    the reason and what to do; the previous result set is restored by the runner."""
    from otmf_exp.errors import os_error_line

    return f"{os_error_line(e)}; free space or make it writable and rerun (an earlier result was kept)"


def show_summary(result: dict[str, Any], out_dir: Path) -> None:
    """The final table and the run dir as the last line. The results are written already: a console
    that fails (a closed pipe, an encoding error) is a warning on stderr, never a failed run."""
    import os

    try:
        print_summary(result, out_dir=out_dir)
        sys.stdout.flush()
    except (BrokenPipeError, SystemExit):  # `... | head` (rich raises SystemExit(1) on a closed pipe)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, UnicodeError) as e:
        print(f"warning: the summary could not be printed ({e}); results are in {out_dir}", file=sys.stderr)


class SweepReport(Callback):
    """Lists a sweep's failed jobs when it ends and exits non-zero (2: bad input only, 1: a crash)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            sweep.reset(config.hydra.sweep.dir)
        except OSError:  # an uncreatable sweep dir: the launcher's mkdir says so in one line next
            pass

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        rows = sweep.failures(config.hydra.sweep.dir)
        if rows:
            print("\n".join(sweep.report(config.hydra.sweep.dir, rows)), file=sys.stderr)
            sys.exit(sweep.exit_code(rows))


def interrupted_line(e: KeyboardInterrupt, overrides: list[str]) -> str:
    """The one line printed on Ctrl-C: where the run stopped and the command that continues it."""
    if not isinstance(e, RunInterrupted):
        return "interrupted"
    keep = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("out_dir", "resume")]
    if not e.resumable:
        cmd = shlex.join([sys.executable, "-m", "otmf_exp.run", *keep, f"out_dir={e.out_dir}"])
        return f"interrupted; {e.out_dir} has no checkpoint to resume from; rerun with: {cmd}"
    cmd = shlex.join([sys.executable, "-m", "otmf_exp.run", *keep, f"out_dir={e.out_dir}", "resume=true"])
    return f"interrupted after step {e.done} of {e.total} (checkpoint kept); resume with: {cmd}"


def main() -> None:
    """Console script ``otmf-exp`` (= ``python -m otmf_exp.run``); every failure is one line
    (:func:`otmf_exp.errors.cli_main`): bad input / config errors exit 2, Ctrl-C 130, a crash 1."""
    code = cli_main(_cli, interrupted_line=lambda e: interrupted_line(e, _CURRENT.get("overrides", [])))
    if code:
        sys.exit(code)


def _cli() -> int:
    check_registry()  # a method YAML without a registered class (or the reverse): one line, not Hydra's
    argv = sys.argv[1:]
    dry = [a for a in argv if a == "--dry-run" or a.startswith("--dry-run=")]
    if dry:  # list a sweep's jobs without running any (nothing written)
        args = [a for a in argv if a not in dry and a not in ("-m", "--multirun")]
        show = None if dry[-1] == "--dry-run=all" else 20
        try:
            lines = sweep.dry_run_lines(args, show)
        except Exception as e:  # a bad override or preset: one line
            raise UserError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        print("\n".join(lines))
        return 0
    if {"-m", "--multirun"} & set(argv) and any(a in ("-c", "--cfg") or a.startswith("--cfg=") for a in argv):
        raise UserError(
            "--cfg prints the config of one run and cannot be combined with -m/--multirun; drop -m to "
            "see one job's config, or use --dry-run to list the sweep's jobs"
        )
    if {"-m", "--multirun"} & set(argv):  # a sweep dir holding results: refused before any job runs
        sweep.check_sweep_dir(argv)
    watch_interrupts()
    logging.raiseExceptions = False  # a console that went away (closed pipe) must not fail the run
    # Hydra prints its own multi-line report of a config error and exits 1; let it raise instead, so
    # cli_main turns it into one `error:` line, exit 2 (a crash still prints its whole traceback)
    user_choice = os.environ.get("HYDRA_FULL_ERROR")
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        _main()
    except ValueError as e:  # Hydra's own flags combined wrongly (e.g. -m with --info)
        if not str(e).startswith("Only one of --run, --multirun"):
            raise
        raise UserError(str(e).splitlines()[0]) from None
    finally:
        if user_choice is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
    return 0


if __name__ == "__main__":
    main()
