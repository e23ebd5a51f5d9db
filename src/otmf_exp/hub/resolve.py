"""Where models and datasets come from: the HuggingFace hub (or its local cache), or a local directory.

Every loader in ``models/`` and ``data/`` resolves ids through this module, so the rules are the
same everywhere:

* ``local_dir`` set (``backbone.local_dir`` / ``task_seq.local_dir``): the id ``org/name`` is read
  from ``<local_dir>/org/name`` and the hub is never contacted. Lay it out with
  ``hf download <id> --local-dir <local_dir>/<id>`` (add ``--repo-type dataset`` for datasets) or
  with ``save_pretrained`` / ``Dataset.save_to_disk``.
* otherwise the hub through ``huggingface_hub`` / ``datasets``, which honour ``HF_HOME``,
  ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE``: a cached copy is used offline.

A missing id (offline, hub unreachable, or absent under ``local_dir``) raises
:class:`~otmf_exp.errors.UserError` with one line naming the id and how to fetch it. It fails
fast: without ``HF_HUB_OFFLINE`` the hub is probed once per process (:func:`hub_offline`, a
``$OTMF_EXP_HUB_PROBE_TIMEOUT`` = 3 s timeout); when it does not answer, the process switches to
the offline mode, so the cache is read directly instead of every lookup waiting for hub timeouts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from otmf_exp.errors import UserError

log = logging.getLogger(__name__)

#: files a model snapshot needs (configs, tokenizers, processors, weights); never TF/Flax weights
_META = ["*.json", "*.txt", "*.model", "*.py"]


def cache_root() -> Path:
    """``$OTMF_EXP_CACHE`` (default ``~/.cache/otmf_exp``): zero-shot heads and the offline zoo."""
    return Path(os.environ.get("OTMF_EXP_CACHE", Path.home() / ".cache" / "otmf_exp"))


def writable_cache(path: Path) -> Path:
    """``path`` (under the cache root) created and proven writable, else one-line :class:`UserError`
    naming it and ``OTMF_EXP_CACHE`` (checked before anything is built into it)."""
    import uuid

    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe_{uuid.uuid4().hex}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"cache directory {path} is not writable ({e.strerror or e}); set OTMF_EXP_CACHE to a "
            "writable directory with free space"
        ) from None
    return path


def fetch_hint(repo_id: str, field: str, repo_type: str = "model") -> str:
    flag = " --repo-type dataset" if repo_type == "dataset" else ""
    return (
        f"fetch it with `hf download{flag} {repo_id}` (`huggingface-cli download{flag} {repo_id}` "
        f"with huggingface_hub<1.0) on a machine with the hub, or set {field}=DIR holding DIR/{repo_id}"
    )


def missing(repo_id: str, field: str, repo_type: str = "model", where: str | None = None) -> UserError:
    """The one-line error for an id that cannot be found."""
    kind = "dataset" if repo_type == "dataset" else "model"
    place = f"not found at {where}" if where else "not in the local HF cache and the hub is not reachable"
    return UserError(f"{kind} {repo_id!r} {place}: {fetch_hint(repo_id, field, repo_type)}")


#: seconds the one hub probe of a process may take (``$OTMF_EXP_HUB_PROBE_TIMEOUT``)
PROBE_TIMEOUT = 3.0
_PROBE: dict[str, bool] = {}


def _probe_url() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT + "/api/models?limit=1"


def _reachable(url: str, timeout: float) -> bool:
    """Any HTTP answer (an error status included) means the hub is reachable."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):  # refused, DNS failure, timeout, no route, bad endpoint
        return False
    return True


def set_offline() -> None:
    """Switch this process (and its child processes) to the HF offline mode: every later hub
    lookup reads the local cache only and fails at once when it lacks the id."""
    import sys

    os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:  # datasets copies the flag at import time
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True


def hub_offline() -> bool:
    """True when the hub must not be contacted: ``HF_HUB_OFFLINE`` set, or the one probe of this
    process found the hub unreachable (then :func:`set_offline` is applied and logged once)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    url = _probe_url()
    if url not in _PROBE:
        timeout = float(os.environ.get("OTMF_EXP_HUB_PROBE_TIMEOUT", PROBE_TIMEOUT))
        _PROBE[url] = _reachable(url, timeout)
        if not _PROBE[url]:
            log.warning("the hub (%s) did not answer within %gs: using the local HF cache only", url, timeout)
    if not _PROBE[url]:
        set_offline()
        return True
    return False


def local_path(repo_id: str, local_dir: str | None) -> Path | None:
    """``<local_dir>/<repo_id>`` when ``local_dir`` is set, else None."""
    if not local_dir:
        return None
    return Path(local_dir).expanduser() / repo_id


def resolve_model_dir(
    repo_id: str,
    local_dir: str | None,
    field: str = "backbone.local_dir",
    weights: tuple[str, ...] = ("*.safetensors", "*.bin"),
) -> Path:
    """A local directory holding the snapshot of model ``repo_id`` (downloaded on first use).

    Weights: safetensors when the repo has them, else ``*.bin`` (a second, narrower download).
    """
    p = local_path(repo_id, local_dir)
    if p is not None:
        if not p.is_dir():
            raise missing(repo_id, field, where=str(p))
        return _recorded(p)
    from huggingface_hub import snapshot_download

    hub_offline()  # probe once: an unreachable hub means the cache only, no timeouts
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=_META + [weights[0]]))
        if len(weights) > 1 and not any(path.glob(weights[0])):
            path = Path(snapshot_download(repo_id, allow_patterns=_META + list(weights[1:])))
    except Exception as e:  # offline / unreachable / unknown id: all end in the same advice
        raise _hub_error(e, repo_id, field) from None
    return _recorded(path)


def _recorded(path: Path) -> Path:
    """``path`` after its content digest (a dir: over its weight files') went to the run's identity."""
    from otmf_exp.runtime import digest

    digest.record(path)
    return path


def resolve_model_file(
    repo_id: str, filenames: list[str], local_dir: str | None, field: str = "backbone.local_dir"
) -> Path:
    """The first of ``filenames`` that exists in model ``repo_id`` (local dir or hub)."""
    p = local_path(repo_id, local_dir)
    if p is not None:
        for name in filenames:
            if (p / name).is_file():
                return _recorded(p / name)
        raise missing(repo_id, field, where=f"{p} (looked for {', '.join(filenames)})")
    from huggingface_hub import hf_hub_download

    hub_offline()
    last: Exception | None = None
    for name in filenames:
        try:
            return _recorded(Path(hf_hub_download(repo_id, name)))
        except Exception as e:
            last = e
    raise _hub_error(last, repo_id, field) from None


def _hub_error(e: Exception | None, repo_id: str, field: str, repo_type: str = "model") -> UserError:
    from huggingface_hub.errors import RepositoryNotFoundError

    if isinstance(e, RepositoryNotFoundError) or type(e).__name__ == "DatasetNotFoundError":
        kind = "dataset" if repo_type == "dataset" else "model"
        return UserError(
            f"{kind} {repo_id!r} does not exist on the hub (or is private); check the id "
            f"or set {field}=DIR holding DIR/{repo_id}"
        )
    log.debug("hub lookup of %s failed: %r", repo_id, e)
    return missing(repo_id, field, repo_type)


# ---- datasets ------------------------------------------------------------------------------
def load_split(
    dataset_id: str, config: str | None, split: str, local_dir: str | None, field: str = "task_seq.local_dir"
) -> Any:
    """One split of a dataset as a ``datasets.Dataset``.

    With ``local_dir``, ``<local_dir>/<dataset_id>`` may be a ``save_to_disk`` directory
    (``DatasetDict``; with a config, ``<...>/<config>/`` may hold it) or a hub-like snapshot
    (parquet / image folders / webdataset shards) read by ``datasets.load_dataset``.
    """
    import datasets

    p = local_path(dataset_id, local_dir)
    if p is not None:
        if not p.is_dir():
            raise missing(dataset_id, field, "dataset", where=str(p))
        for d in ([p / config] if config else []) + [p]:
            if (d / "dataset_dict.json").is_file():
                dd = datasets.load_from_disk(str(d))
                if split not in dd:
                    raise UserError(
                        f"dataset {dataset_id!r} at {d} has no split {split!r} (has {sorted(dd)})"
                    )
                return dd[split]
            if (d / "state.json").is_file() and d.name == split:
                return datasets.load_from_disk(str(d))
        try:
            return datasets.load_dataset(str(p), config, split=split)
        except ValueError as e:  # unknown split / config
            raise UserError(f"dataset {dataset_id!r} at {p}: {str(e).splitlines()[0]}") from None
    hub_offline()
    try:
        return datasets.load_dataset(dataset_id, config, split=split)
    except OSError as e:  # ConnectionError (offline / unreachable), DatasetNotFoundError, missing files
        raise _hub_error(e, dataset_id, field, "dataset") from None
    except ValueError as e:  # unknown config or split
        raise UserError(f"dataset {dataset_id!r}: {str(e).splitlines()[0]}") from None


# ---- fingerprints ----------------------------------------------------------------------------
def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (cache keys)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def dir_fingerprint(path: Path) -> list[Any]:
    """Path plus (name, size, mtime) of its weight files: changes when the weights change."""
    path = Path(path)
    files = (
        sorted(f for pat in ("*.safetensors", "*.bin", "*.pt", "*.pth") for f in path.glob(pat))
        if path.is_dir()
        else [path]
    )
    return [str(path.resolve())] + [
        (f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()
    ]
