"""Weights & Biases tracker (``logger=wandb``): the :class:`~otmf_exp.tracking.Tracker` used for
comparing runs of the OTMF reproduction (arXiv 2511.19561) and its baselines in the W&B UI.

What one run sends (one W&B run per experiment, also per multirun job):

- ``config``: the resolved run config as a plain dict (``method.name``, ``task_seq.name``, ...).
- ``group`` = ``logger.group`` or the task sequence name; ``name`` = the method name followed by
  the job's Hydra overrides (``task_arithmetic order_seed=3``), or the method name alone when
  Hydra is not running (tests, ``run_experiment`` called from Python); ``tags`` from the config.
- per continual step (W&B ``step`` = continual step 1..T): ``step/acc/<task>`` for every seen
  task, ``step/acc`` (mean over seen tasks), ``step/time_s``, ``step/eval_time_s``,
  ``step/peak_memory_mb``; numeric method records as ``step/<key>`` (dicts flattened to
  ``step/<key>/<sub>``); every list-valued record (a loss curve over the iterations of that
  step: OTMF ``ot_loss_pre`` / ``ot_loss_post``, AdaMerging ``entropy_curve``) as
  ``step/<key>/first``, ``step/<key>/last``, ``step/<key>/min`` scalars (a series over steps)
  **and** a line chart ``curves/<key>/step_<k>`` (x = iteration) built from a ``wandb.Table``.
- summary: ``acc``, ``bwt``, ``normalized_acc``, ``per_task/<task>``, ``wall_time_s``,
  ``peak_memory_mb``, ``order`` and ``acc_matrix`` (a ``wandb.Table``: one row per step).
- ``finish(exit_code=1)`` when the run failed, ``finish()`` otherwise; every multirun job
  starts with ``reinit="finish_previous"`` so no state leaks from the previous job.

``mode``: ``online``, ``offline`` (files only, in ``<run dir>/wandb/offline-run-*``; ``wandb
sync`` uploads them later), ``disabled`` (no W&B at all). W&B's environment variables are
honoured wherever the config leaves a value null (:func:`settings`): ``WANDB_MODE`` (else
online; ``WANDB_DISABLED=true`` = disabled), ``WANDB_PROJECT`` (else ``otmf_exp``),
``WANDB_ENTITY``, ``WANDB_RUN_GROUP`` (else the task sequence), ``WANDB_TAGS`` (comma-separated,
when ``tags`` is empty), ``WANDB_DIR`` (else the run directory), ``WANDB_NAME`` and
``WANDB_JOB_TYPE``; a value set in the config wins. :func:`read_offline_run` reads an offline
run's records back without a network.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from pathlib import Path
from typing import Any

from otmf_exp.errors import UserError

log = logging.getLogger(__name__)

#: record keys that are not logged as ``step/<key>`` (they are logged explicitly or are labels)
_STEP_SKIP = {"step", "task", "acc", "avg_acc", "memory_kind"}
#: overrides that only change how a run is displayed or stored, not what it computes
_NAME_SKIP = ("progress", "out_dir", "logger", "hydra", "device", "keep_checkpoints", "resume")


def hydra_overrides() -> list[str]:
    """The current Hydra job's task overrides, or ``[]`` when Hydra is not running."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return []
        return [str(o) for o in HydraConfig.get().overrides.task]
    except Exception:  # Hydra absent or not configured: the name falls back to the method
        return []


def run_name(method: str, overrides: list[str]) -> str:
    """``method`` + the overrides that change the experiment (``method=`` itself is dropped)."""
    keep = []
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key == "method" or key.split(".")[0].split("/")[0] in _NAME_SKIP:
            continue
        keep.append(o)
    return " ".join([method, *keep])


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(float(v)) else None


def settings(cfg: Any, config: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """The ``wandb.init`` arguments: the logger config's values, W&B's environment variables where
    the config leaves them null, then this project's defaults."""
    env = os.environ
    mode = cfg.get("mode") or env.get("WANDB_MODE") or "online"
    if not cfg.get("mode") and env.get("WANDB_DISABLED", "").lower() in ("true", "1", "yes"):
        mode = "disabled"
    tags = [str(t) for t in (cfg.get("tags") or [])] or [
        t.strip() for t in env.get("WANDB_TAGS", "").split(",") if t.strip()
    ]
    method = str(config.get("method", {}).get("name", "run"))
    return {
        "mode": {"dryrun": "offline", "run": "online"}.get(mode, mode),
        "project": cfg.get("project") or env.get("WANDB_PROJECT") or "otmf_exp",
        "entity": cfg.get("entity") or env.get("WANDB_ENTITY") or None,
        "group": cfg.get("group") or env.get("WANDB_RUN_GROUP") or config.get("task_seq", {}).get("name"),
        "tags": tags,
        "name": env.get("WANDB_NAME") or run_name(method, hydra_overrides()),
        "dir": str(cfg.get("dir") or env.get("WANDB_DIR") or out_dir),
        "job_type": env.get("WANDB_JOB_TYPE") or str(config.get("protocol", "continual")),
    }


class WandbTracker:
    """Sends one run to W&B; see the module docstring for the key layout."""

    def __init__(self, logger_cfg: Any) -> None:
        self.cfg = logger_cfg
        self.run: Any = None
        mode = settings(logger_cfg, {}, ".")["mode"]  # checked before the run's heavy work
        if mode not in ("online", "offline", "disabled"):
            raise UserError(f"WANDB_MODE must be online, offline or disabled, got {mode!r}")
        wdir = logger_cfg.get("dir") or os.environ.get("WANDB_DIR")
        if wdir and Path(wdir).exists() and not Path(wdir).is_dir():
            raise UserError(f"logger.dir / WANDB_DIR {wdir} is a file; give a directory for W&B's files")

    def start(self, config: dict[str, Any], out_dir: str) -> None:
        args = settings(self.cfg, config, out_dir)
        if args["mode"] == "disabled":  # logger.mode=null with WANDB_MODE=disabled: no W&B at all
            log.info("W&B disabled (logger.mode / WANDB_MODE)")
            return
        import wandb

        for p in (Path(args["dir"]), Path(args["dir"]) / "wandb"):  # W&B writes there itself: no links
            if p.is_symlink():
                raise UserError(
                    f"{p} is a symbolic link; W&B's files are never written through links: remove it or set logger.dir"
                )
        try:
            Path(args["dir"]).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(
                f"cannot create W&B's directory {args['dir']} ({e.strerror or e}); set logger.dir to a writable directory"
            ) from None
        try:
            self.run = wandb.init(**args, config=config, reinit="finish_previous")
        except Exception as e:  # no API key, no network, bad entity: one clear line, not a traceback
            raise UserError(
                f"W&B could not start a run ({type(e).__name__}: {e}); run `wandb login`, "
                "or use logger.mode=offline (sync later) or logger=none"
            ) from e
        log.info(
            "W&B run %s (mode=%s, group=%s) in %s", self.run.name, args["mode"], args["group"], args["dir"]
        )

    def log_step(self, record: dict[str, Any]) -> None:
        if self.run is None:
            return
        import wandb

        k = int(record["step"])
        data: dict[str, Any] = {f"step/acc/{t}": v for t, v in record.get("acc", {}).items()}
        data["step/acc"] = record.get("avg_acc")
        for key, value in record.items():
            if key in _STEP_SKIP:
                continue
            if isinstance(value, dict):
                for sub, v in value.items():
                    if _number(v) is not None:
                        data[f"step/{key}/{sub}"] = _number(v)
            elif isinstance(value, (list, tuple)):
                curve = [x for x in (_number(v) for v in value) if x is not None]
                if not curve:
                    continue
                data.update(
                    {
                        f"step/{key}/first": curve[0],
                        f"step/{key}/last": curve[-1],
                        f"step/{key}/min": min(curve),
                    }
                )
                table = wandb.Table(columns=["iteration", key], data=[[i, v] for i, v in enumerate(curve)])
                data[f"curves/{key}/step_{k}"] = wandb.plot.line(
                    table, "iteration", key, title=f"{key} at step {k} ({record.get('task')})"
                )
            elif _number(value) is not None:
                data[f"step/{key}"] = _number(value)
        self.run.log(data, step=k)

    def finish(self, metrics: dict[str, Any] | None, failed: bool = False) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        try:
            if metrics is not None:
                import wandb

                summary = {
                    k: metrics.get(k)
                    for k in ("acc", "bwt", "normalized_acc", "wall_time_s", "peak_memory_mb")
                }
                summary.update({f"per_task/{t}": v for t, v in (metrics.get("per_task") or {}).items()})
                summary["order"] = list(metrics.get("order") or [])
                run.summary.update(summary)
                order = list(metrics.get("order") or [])
                rows = [
                    [j + 1, order[j] if j < len(order) else "joint", *row]
                    for j, row in enumerate(metrics.get("acc_matrix") or [])
                ]
                run.log({"acc_matrix": wandb.Table(columns=["after_step", "task_added", *order], data=rows)})
        finally:
            run.finish(exit_code=1 if failed else 0)


# ---- reading an offline run back (no network, no wandb internals beyond the protobufs) ------
_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(path: Path) -> list[bytes]:
    """Payloads of a ``run-*.wandb`` file (LevelDB log format with a 7-byte ``:W&B`` file header)."""
    b = path.read_bytes()
    if b[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log")
    out, buf, pos = [], b"", _HEADER
    while pos + _HEADER <= len(b):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", b[pos : pos + _HEADER])
        pos += _HEADER
        if kind == 0 and n == 0:
            break
        data, pos = b[pos : pos + n], pos + n
        if kind == _FULL:
            out.append(data)
        elif kind == _FIRST:
            buf = data
        elif kind == _MIDDLE:
            buf += data
        elif kind == _LAST:
            out.append(buf + data)
    return out


def _set(d: dict[str, Any], item: Any) -> None:
    keys = list(item.nested_key) or [item.key]
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = json.loads(item.value_json)


def read_offline_run(run_dir: str | Path) -> dict[str, Any]:
    """``{"name", "group", "config", "summary", "history", "exit_code"}`` of an offline run dir
    (``.../wandb/offline-run-*``), decoded from its ``run-*.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(Path(run_dir).glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    out: dict[str, Any] = {
        "name": None,
        "group": None,
        "config": {},
        "summary": {},
        "history": [],
        "exit_code": None,
    }
    for payload in _records(files[0]):
        rec = pb.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["name"], out["group"] = rec.run.display_name, rec.run.run_group
            for u in rec.run.config.update:
                _set(out["config"], u)
        elif kind == "config":
            for u in rec.config.update:
                _set(out["config"], u)
        elif kind == "summary":
            for u in rec.summary.update:
                _set(out["summary"], u)
        elif kind == "history":
            row: dict[str, Any] = {}
            for it in rec.history.item:
                row["/".join(list(it.nested_key) or [it.key])] = json.loads(it.value_json)
            out["history"].append(row)
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
    return out
