"""What a checkpoint must agree with before a run resumes from it: the config that produced it.

A checkpoint's ``progress.json`` records ``config`` = the run's resolved config minus the keys
that cannot change a result (:func:`ignored`), with the method's effective config (top-level
``alpha`` applied), and ``config_hash`` = its sha256. ``resume=true`` compares the checkpoint's
config with the run's, key by key, before any model or data is loaded (:func:`precheck`), and
refuses the first difference with one line naming the key and both values. A ``progress.json``
without the expected structure is refused like a corrupted file. :func:`start` then loads the
state (after the run's setup) or says that the run starts fresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

from otmf_exp.errors import UserError

log = logging.getLogger(__name__)


def ignored() -> tuple[str, ...]:
    """The keys a resume never compares: every field declared ``result_neutral`` on the schema
    (:func:`otmf_exp.config.neutral_config_keys`; no hand list, so a new lever declares itself)."""
    from otmf_exp.config import neutral_config_keys

    return neutral_config_keys()


#: the runner's ``progress`` part of ``progress.json``: key -> type
_PROGRESS = {"order": list, "method": str, "rows": list, "records": list, "individual": dict, "config": dict}


def result_config(cfg: dict[str, Any], method_cfg: dict[str, Any]) -> dict[str, Any]:
    """The result-relevant config: ``cfg`` (a plain resolved dict) with ``method`` replaced by the
    effective ``method_cfg`` and the :func:`ignored` keys dropped; JSON-normalised."""
    out = json.loads(json.dumps({**cfg, "method": method_cfg}, default=str))
    for key in ignored():
        node, _, leaf = key.rpartition(".")
        parent = _get(out, node) if node else out
        if isinstance(parent, dict):
            parent.pop(leaf, None)
    return out


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted leaves; top-level scalars first (so ``alpha`` is named before ``method.alpha``)."""
    if not isinstance(d, dict):
        return {prefix: d}
    items = sorted(d.items(), key=lambda kv: isinstance(kv[1], dict))
    out: dict[str, Any] = {}
    for k, v in items:
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(_flat(v, key))
        else:
            out[key] = v
    return out


def first_difference(saved: dict[str, Any], now: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """``(dotted key, saved value, current value)`` of the first difference, or None."""
    a, b = _flat(saved), _flat(now)
    for key in list(b) + [k for k in a if k not in b]:
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if va != vb:
            return key, va, vb
    return None


def progress_problem(doc: dict[str, Any]) -> str | None:
    """What is structurally wrong with a checkpoint doc's ``progress`` part (None = fine)."""
    prog = doc.get("progress")
    if not isinstance(prog, dict):
        return "'progress' missing or not an object"
    for key, typ in _PROGRESS.items():
        if not isinstance(prog.get(key), typ):
            return f"'progress.{key}' missing or not a {typ.__name__} (written by an older version?)"
    if len(prog["rows"]) != doc["step"]:
        return f"{len(prog['rows'])} accuracy rows for step {doc['step']}"
    for i, row in enumerate(prog["rows"]):  # row i: the accuracies (%) of tasks 1..i+1 after step i+1
        ok = isinstance(row, list) and len(row) == i + 1
        if not ok or not all(_is_acc(v) for v in row):
            return f"accuracy row {i + 1} is {json.dumps(row)}: expected {i + 1} finite values in [0, 100]"
    return None


def _is_acc(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 100


def check_same_config(
    saved: dict[str, Any], now: dict[str, Any], ckpt_dir: Path, whose: str = "the checkpoint's"
) -> None:
    """Refuse to resume when a result-relevant value differs from the checkpoint's (``whose``)."""
    if config_hash(saved) == config_hash(now):
        return
    diff = first_difference(saved, now)
    if diff is None:
        return
    key, was, is_ = diff
    raise UserError(
        f"cannot resume from {ckpt_dir}: it was run with {key}={json.dumps(was)}, this run has "
        f"{key}={json.dumps(is_)}; use {whose} value or a new out_dir (or drop resume=true "
        "to start over there)"
    )


def resume_from(
    out_dir: Path,
    device: Any,
    method: Any,
    pretrained: dict[str, Any],
    config: dict[str, Any],
) -> tuple[Any, dict[str, Any]] | None:
    """The state and ``progress`` of the last checkpoint in ``out_dir`` if it was produced by
    ``config`` (else one-line :class:`UserError`); None when there is no checkpoint."""
    from otmf_exp.runtime import checkpoint

    found = checkpoint.load_latest(out_dir, device, progress_problem)
    if found is None:
        return None
    step, tensors, doc = found
    d = checkpoint.steps(out_dir)[-1]
    check_same_config(doc["progress"]["config"], config, d)
    try:
        state = method.load_state(step, tensors, doc["scalars"])
        method.check_state(state, pretrained)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(checkpoint.broken_message(d / checkpoint.STATE, str(e))) from None
    return state, doc["progress"]


def precheck(cfg: Any, out_dir: Path, config: dict[str, Any]) -> str | None:
    """With ``resume=true`` (continual): refuse a checkpoint whose ``progress.json`` is broken or
    was produced by another config, before any model or data is loaded (tensors are read later,
    by :func:`start`)."""
    from otmf_exp.runtime import checkpoint

    if not (cfg.resume and cfg.protocol == "continual"):
        return None
    found = checkpoint.latest_doc(out_dir, progress_problem)
    if found is not None:
        check_same_config(found[1]["progress"]["config"], config, found[0])
        return check_same_code(found[1]["progress"].get("code_version"), cfg, found[0])
    return None


def check_same_models(saved: Any, current: Any, out_dir: Path) -> None:
    """Refuse to resume when a model the checkpoint was built from (θ₀ or a θ_t, by content
    digest) differs from what this run reads: one line naming the model and both digests (12 hex).
    ``current(name)`` gives this run's digest. A checkpoint of an older version (no ``models``) is
    resumed with a warning."""
    from otmf_exp.runtime.digest import short

    if not isinstance(saved, dict):
        log.warning("checkpoint in %s records no model digests (older version): not checked", out_dir)
        return
    for name in sorted(saved, key=lambda n: n != "pretrained"):
        now = current(name)
        if now is None and name.startswith("head:"):  # a head this run could not cache: nothing to compare
            log.warning("zero-shot head of task %r has no cached file this time: not compared", name[5:])
            continue
        if now != saved[name]:
            what = (
                "the pre-trained model"
                if name == "pretrained"
                else f"the zero-shot head of task {name[5:]!r}"
                if name.startswith("head:")
                else f"the model of task {name!r}"
            )
            raise UserError(
                f"cannot resume from {out_dir}: {what} changed since the checkpoint (sha256 "
                f"{short(saved[name])} then, {short(now)} now); restore those models, use a new "
                "out_dir, or drop resume=true to start over there"
            )


def check_same_code(saved: str | None, cfg: Any, ckpt_dir: Path) -> str | None:
    """Refuse a checkpoint written by another code version unless ``resume_across_versions=true``;
    returns the checkpoint's version when it differs (and was allowed), else None."""
    from otmf_exp.runtime.provenance import code_version

    now = code_version()
    if saved is None or saved == now:
        return None
    if not cfg.get("resume_across_versions", False):
        raise UserError(
            f"cannot resume from {ckpt_dir}: it was written by code version {saved}, this is {now}; "
            "check out that version, use a new out_dir, or pass resume_across_versions=true (recorded)"
        )
    log.warning("resuming a checkpoint of code version %s with %s (resume_across_versions=true)", saved, now)
    return saved


def start(
    cfg: Any,
    out_dir: Path,
    device: Any,
    method: Any,
    pretrained: dict[str, Any],
    config: dict[str, Any],
    order: list[str],
) -> tuple[Any, dict[str, Any]] | None:
    """Where a run starts. With ``resume=true``: the checkpointed state and progress when they
    match this run (else one-line :class:`UserError`), or None with a warning that it starts fresh.
    A fresh continual run removes ``out_dir``'s checkpoint step dirs (only those: other files under
    ``checkpoints/`` are the user's), so it never mixes with another run's."""
    from otmf_exp.runtime import checkpoint

    found = None
    if cfg.resume and cfg.protocol == "joint":
        log.warning("resume=true: the joint protocol keeps no checkpoints; running from the start")
    elif cfg.resume:
        found = resume_from(out_dir, device, method, pretrained, config)
        if found is None:
            log.warning("resume=true but %s has no checkpoint: starting fresh", out_dir)
        elif found[1]["order"] != order or found[1]["method"] != cfg.method.name:
            raise UserError(f"checkpoint in {out_dir} is for another order or method; use a new out_dir")
    if found is None and cfg.protocol == "continual":
        checkpoint.remove_steps(out_dir)
    return found
