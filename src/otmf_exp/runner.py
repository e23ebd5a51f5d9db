"""The continual loop: for each task, ``method.step``; evaluate every task seen; record; checkpoint.

``run_experiment(cfg, out_dir)`` is the whole experiment; the Hydra entry point (``run.py``)
only composes the config and calls it. Output contract (in ``out_dir``): ``config.yaml``,
``steps.jsonl``, ``acc_matrix.csv``, ``metrics.json`` (written last: its presence means the run
completed), ``run.log``, optional ``merged.safetensors`` + ``merged_model/`` and ``checkpoints/``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError

from otmf_exp.config import check_cross_fields, check_run_config, method_config, resolve_order
from otmf_exp.data import build_task_data
from otmf_exp.errors import RunInterrupted, UserError, interrupted
from otmf_exp.merging import METHODS, ContinualState, MethodContext, TaskInput
from otmf_exp.merging.task_vectors import num_bytes
from otmf_exp.models import build_backbone, export
from otmf_exp.reporting import metrics
from otmf_exp.runtime import checkpoint, digest, files, manifest, resume
from otmf_exp.runtime.files import check_writable
from otmf_exp.runtime.lock import RunDirLock
from otmf_exp.runtime.measure import current_memory_mb, measure
from otmf_exp.runtime.provenance import code_version, provenance
from otmf_exp.runtime.session import (
    apply_threads,
    attach_log_file,
    detach_log_file,
    resolve_device,
    resolve_threads,
    seed_everything,
)
from otmf_exp.tracking import make_tracker

log = logging.getLogger(__name__)


class Experiment:
    """One run: built from a composed config; ``run()`` returns the metrics dict."""

    def __init__(self, cfg: DictConfig, out_dir: Path, jobs: int = 1) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        # --- validation before any heavy work (nothing in out_dir is touched before it passes) ---
        check_run_config(cfg)
        self.order = resolve_order(cfg)
        check_cross_fields(cfg, self.order)  # degenerate settings, before any heavy work
        self.method_cfg = method_config(cfg)
        self.result_config = resume.result_config(
            OmegaConf.to_container(cfg, resolve=True), OmegaConf.to_container(self.method_cfg, resolve=True)
        )
        check_writable(self.out_dir)
        self.device = resolve_device(cfg.device)
        self.threads = resolve_threads(cfg.get("threads", "auto"), str(cfg.backbone.kind), jobs)
        self.resumed_from_version: str | None = None
        self.saved_step = 0  # last checkpointed continual step
        self.eval_bs = int(cfg.backbone.batch_size)
        self.records: list[dict[str, Any]] = []
        self._step_records: dict[str, Any] = {}
        self.identity: dict[str, str] = {}  # ModelIdentity: "pretrained" / task -> sha256 of its files

    # ---- helpers --------------------------------------------------------------------------
    def _record(self, key: str, value: Any) -> None:
        self._step_records[key] = value

    def _identify(self, name: str, got: list[str]) -> None:
        """Record the content digest of what loading ``name`` read (the run's ``ModelIdentity``)."""
        sha = digest.identity_of(got)
        if sha is not None:
            self.identity[name] = sha

    def _model_digest(self, name: str) -> str | None:
        """The digest of model ``name`` as this run reads it (a task not loaded yet is read now)."""
        if name not in self.identity and name != "pretrained" and not name.startswith("head:"):
            with digest.collecting() as got:
                self.backbone.identify_finetuned(name)  # its files' digests, weights unread
            self._identify(name, got)
        return self.identity.get(name)

    def _head(self, state: ContinualState, task: str) -> torch.Tensor | None:
        return state.heads.get(task, self.zero_shot[task])

    def _task(self, i: int, prev: str | None) -> TaskInput:
        name = self.order[i]
        with digest.collecting() as got:
            weights = self.backbone.load_finetuned(name)
        self._identify(name, got)
        if self.cfg.eval_individual and name not in self.individual:
            self.individual[name] = self.backbone.evaluate(
                weights, self.zero_shot[name], self.data[name], self.cfg.eval_split, self.eval_bs
            )
        return TaskInput(
            name,
            i,
            weights,
            self.zero_shot[name],
            self.data[name],
            self.data[prev] if prev is not None else None,
            {t: self.data[t] for t in self.order[: i + 1]},
            owned=True,
            last=i == len(self.order) - 1,
        )

    def _evaluate(self, state: ContinualState, upto: int) -> list[float]:
        if self.method.evaluates_individually:
            return [self.individual[t] for t in self.order[: upto + 1]]
        weights = self.method.merged(state, self.pretrained)
        with self.method.forward_context(state):  # one task's batches at a time (per-batch routing)
            return [
                self.backbone.evaluate(
                    weights, self._head(state, t), self.data[t], self.cfg.eval_split, self.eval_bs
                )
                for t in self.order[: upto + 1]
            ]

    # ---- the experiment -------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.set_float32_matmul_precision(str(cfg.matmul_precision))  # once, before any model work
        seed_everything(int(cfg.seed))
        apply_threads(self.threads)  # once per run, before any model work
        with digest.collecting() as got:
            self.backbone = build_backbone(cfg.backbone, self.device, progress=cfg.progress)
        self._identify("pretrained", got)
        self.data = {t: build_task_data(t, cfg.task_seq, self.backbone) for t in self.order}
        for t, d in self.data.items():
            if d.size(cfg.eval_split) == 0:
                raise UserError(f"task {t!r}: split {cfg.eval_split!r} is empty")
        self.zero_shot = {}
        for t in self.order:
            with digest.collecting() as got:  # a cached head file (HF CLIP / open_clip) has a digest
                self.zero_shot[t] = self.backbone.zero_shot_head(self.data[t])
            self._identify(f"head:{t}", got)
        ctx = MethodContext(
            self.backbone,
            self.device,
            torch.Generator().manual_seed(int(cfg.seed)),
            progress=cfg.progress,
            record=self._record,
            seed=int(cfg.seed),
        )
        self.method = METHODS[cfg.method.name](self.method_cfg, ctx, protocol=cfg.protocol)
        self.pretrained = self.backbone.pretrained_state()
        self.individual: dict[str, float] = {}
        self.baseline_memory_mb = current_memory_mb(self.device)  # θ₀, data handles and heads loaded

    def run(self) -> dict[str, Any]:
        with RunDirLock(self.out_dir):  # one run at a time in out_dir (one line if another owns it)
            handler = attach_log_file(self.out_dir)
            tracker = make_tracker(self.cfg.get("logger"))
            result = None
            moved = False  # the old result set, moved to .previous/ until the new one is complete
            try:
                manifest.restore_left_over(self.out_dir)  # a killed rerun's old result goes back
                manifest.check_owned(self.out_dir)  # never overwrite a file no run of ours wrote
                if self.cfg.resume:  # the same run (its identity: the result-relevant config) or refused
                    manifest.check_identity(self.out_dir, self.result_config)
                # before heavy work
                self.resumed_from_version = resume.precheck(self.cfg, self.out_dir, self.result_config)
                self.setup()
                start = resume.start(
                    self.cfg,
                    self.out_dir,
                    self.device,
                    self.method,
                    self.pretrained,
                    self.result_config,
                    self.order,
                )
                if start is not None:
                    resume.check_same_models(start[1].get("models"), self._model_digest, self.out_dir)
                # every check passed: the old result steps aside (restored on failure)
                moved = manifest.set_aside(self.out_dir)
                manifest.claim(self.out_dir, "config.yaml", "steps.jsonl")
                files.write_text(self.out_dir / "config.yaml", OmegaConf.to_yaml(self.cfg, resolve=True))
                self.provenance = provenance(self.threads, self.device)
                if self.resumed_from_version:
                    self.provenance["resumed_from_code_version"] = self.resumed_from_version
                tracker.start(
                    {**OmegaConf.to_container(self.cfg, resolve=True), "provenance": self.provenance},
                    str(self.out_dir),
                )
                t0 = time.perf_counter()
                if self.cfg.protocol == "continual":
                    matrix, state = self._continual(tracker, start)
                else:
                    matrix, state = self._joint(tracker)
                result = self._finish(matrix, state, time.perf_counter() - t0)
                manifest.drop_previous(self.out_dir)
                return result
            except Exception:
                if not interrupted():  # else native code turned Ctrl-C into an error of its own
                    raise
                raise self._interrupted() from None
            except KeyboardInterrupt:
                raise self._interrupted() from None
            finally:
                if moved and result is None:  # failed or interrupted: the old complete result stays
                    manifest.restore(self.out_dir)
                tracker.finish(result, failed=result is None)
                detach_log_file(handler)

    def _interrupted(self) -> RunInterrupted:
        keep = self.cfg.protocol == "continual" and self.cfg.keep_checkpoints != "none"
        resumable = keep and self.saved_step > 0
        return RunInterrupted(str(self.out_dir), self.saved_step, len(self.order), resumable)

    def _continual(
        self, tracker: Any, start: tuple[ContinualState, dict[str, Any]] | None
    ) -> tuple[list[list[float | None]], ContinualState]:
        cfg = self.cfg
        state = self.method.init(self.pretrained)
        rows: list[list[float]] = []
        if start is not None:
            state, prog = start
            rows, self.records, self.individual = prog["rows"], prog["records"], prog["individual"]
            self.saved_step = state.step
            log.info("resuming from step %d of %d", state.step, len(self.order))
        for i in range(state.step, len(self.order)):
            seed_everything(int(cfg.seed) * 1000 + i)  # per-step seeding: resumed == uninterrupted
            self._step_records = {}
            self.backbone.eval_where = f"at step {i + 1}"  # named by a non-finite-logits error
            task = self._task(i, self.order[i - 1] if i > 0 else None)
            with measure(self.device) as usage:
                state = self.method.step(state, task, self.pretrained)
            del task
            state_mb = state.nbytes() / 2**20
            t_eval = time.perf_counter()
            row = self._evaluate(state, i)
            rows.append(row)
            rec = {
                "step": i + 1,
                "task": self.order[i],
                "acc": dict(zip(self.order, row)),
                "avg_acc": sum(row) / len(row),
                "time_s": usage.wall_s,
                "eval_time_s": time.perf_counter() - t_eval,
                "peak_memory_mb": usage.peak_memory_mb,
                "start_memory_mb": usage.start_memory_mb,
                "memory_kind": usage.memory_kind,
                "state_mb": state_mb,
                **self._step_records,
            }
            self.records.append(rec)
            files.write_jsonl(self.out_dir / "steps.jsonl", self.records)
            tracker.log_step(rec)
            log.info(
                "step %d/%d %-12s avg acc %.2f (merge %.2fs)",
                i + 1,
                len(self.order),
                self.order[i],
                rec["avg_acc"],
                usage.wall_s,
            )
            checkpoint.save(
                self.out_dir,
                state.step,
                self.method.state_tensors(state),
                {
                    "scalars": state.scalars,
                    "progress": {
                        "order": self.order,
                        "method": cfg.method.name,
                        "rows": rows,
                        "records": self.records,
                        "individual": self.individual,
                        "config": self.result_config,
                        "config_hash": resume.config_hash(self.result_config),
                        "code_version": code_version(),
                        "models": dict(self.identity),
                    },
                },
                cfg.keep_checkpoints,
            )
            self.saved_step = state.step
        matrix = [list(r) + [None] * (len(self.order) - len(r)) for r in rows]
        return matrix, state

    def _joint(self, tracker: Any) -> tuple[list[list[float | None]], ContinualState]:
        load_s = 0.0

        def tasks() -> Iterator[TaskInput]:
            nonlocal load_s
            for i in range(len(self.order)):
                t0 = time.perf_counter()
                task = self._task(i, self.order[i - 1] if i > 0 else None)
                load_s += time.perf_counter() - t0
                yield task

        self._step_records = {}
        with measure(self.device) as usage:
            state = self.method.joint(self.pretrained, tasks())
        row = self._evaluate(state, len(self.order) - 1)
        # time_s = merging only, as in the continual protocol (loading θ_t and the individual
        # evaluations happen lazily inside the method's task stream and are reported apart)
        rec = {
            "step": len(self.order),
            "task": "joint",
            "acc": dict(zip(self.order, row)),
            "avg_acc": sum(row) / len(row),
            "time_s": usage.wall_s - load_s,
            "load_time_s": load_s,
            "peak_memory_mb": usage.peak_memory_mb,
            "start_memory_mb": usage.start_memory_mb,
            "memory_kind": usage.memory_kind,
            "state_mb": state.nbytes() / 2**20,
            **self._step_records,
        }
        self.records.append(rec)
        files.write_jsonl(self.out_dir / "steps.jsonl", [rec])
        tracker.log_step(rec)
        return [row], state

    def _finish(self, matrix: list[list[float | None]], state: ContinualState, wall: float) -> dict[str, Any]:
        cfg = self.cfg
        final = metrics.final_row(matrix)
        ind = [self.individual.get(t) for t in self.order]
        out = {
            "method": cfg.method.name,
            "task_seq": cfg.task_seq.name,
            "backbone": cfg.backbone.name,
            "protocol": cfg.protocol,
            "seed": int(cfg.seed),
            "order": self.order,
            "alpha": cfg.alpha,
            "matmul_precision": str(cfg.matmul_precision),
            "method_config": OmegaConf.to_container(self.method_cfg, resolve=True),
            "acc": metrics.acc(matrix),
            "bwt": metrics.bwt(matrix),
            "normalized_acc": metrics.normalized_acc(matrix, ind) if None not in ind else None,
            "per_task": dict(zip(self.order, final)),
            "individual": dict(zip(self.order, ind)),
            "acc_matrix": matrix,
            "wall_time_s": wall,
            "peak_memory_mb": max(r["peak_memory_mb"] for r in self.records),
            "baseline_memory_mb": self.baseline_memory_mb,
            "model_mb": num_bytes(self.pretrained) / 2**20,
            "state_mb": state.nbytes() / 2**20,
            "state_growth": self.method.state_growth,
            "state_growth_mb_per_task": self.method.state_growth_bytes(self.pretrained) / 2**20,
            "memory_kind": self.records[-1]["memory_kind"],
            "device": str(self.device),
            "provenance": {**self.provenance, "models": dict(self.identity)},
        }
        merged_names = ["merged.safetensors", "merged_model"] if cfg.save_merged else []
        manifest.claim(self.out_dir, "acc_matrix.csv", "metrics.json", *merged_names)
        manifest.record_config(self.out_dir, self.result_config, resume.config_hash(self.result_config))
        if cfg.save_merged:
            merged = self.method.merged(state, self.pretrained)
            files.write_safetensors(
                self.out_dir / "merged.safetensors", {k: v.cpu() for k, v in merged.items()}
            )
            try:  # merged_model/: the backbone's own format; a full disk is one line, the old result restored
                export.save_run_model(self, state, merged, out)
            except (OSError, SafetensorError) as e:
                raise files.write_error(self.out_dir / "merged_model", e) from None
        files.write_text(self.out_dir / "acc_matrix.csv", metrics.matrix_csv(matrix, self.order))
        files.write_json(self.out_dir / "metrics.json", out)
        return out


def run_experiment(cfg: DictConfig, out_dir: str | Path, jobs: int = 1) -> dict[str, Any]:
    """Run one experiment described by a composed config; returns the metrics dict. ``jobs``: sweep
    jobs running at once beside this one (``threads=auto`` shares the CPUs among them)."""
    return Experiment(cfg, Path(out_dir), jobs).run()
