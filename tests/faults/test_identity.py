"""Fault injection, issue 27 class 2 (identity of the models): every model file is named by its
content digest; the zoo rebuilds a file whose bytes are not the ones it built; resume refuses a
checkpoint built from other models in one line; metrics.json records the digests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from faults.conftest import RUN, one_error
from otmf_exp.runtime import digest


def _run(out: Path, *extra: str) -> dict:
    from hydra import compose, initialize_config_module

    from otmf_exp.runner import run_experiment

    with initialize_config_module(config_module="otmf_exp.conf", version_base="1.3"):
        cfg = compose(config_name="run", overrides=[*RUN, *extra])
    return run_experiment(cfg, out)


def _resave(path: Path, tensors: dict, key_from: Path) -> None:
    """Write ``tensors`` to ``path`` with the metadata (zoo key) of ``key_from``."""
    with safe_open(str(key_from), "pt") as f:
        meta = f.metadata()
    save_file(tensors, str(path), metadata=meta)


def test_digest_cache_hit_avoids_rehash(tmp_path, monkeypatch):
    monkeypatch.setenv("OTMF_EXP_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x" * 3000)
    before = digest.HASHED[0]
    a = digest.file_digest(f)
    assert digest.HASHED[0] == before + 1
    assert digest.file_digest(f) == a and digest.HASHED[0] == before + 1  # cached: not hashed again
    f.write_bytes(b"y" * 3000)  # same size, new content and mtime
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    b = digest.file_digest(f)
    assert digest.HASHED[0] == before + 2 and b != a


def test_swapped_zoo_file_is_rebuilt_and_metrics_record_digests(zoo_copy, tmp_path, caplog):
    clean = _run(tmp_path / "clean")
    target = zoo_copy / "rot90.safetensors"
    original = digest.file_digest(target)
    models = clean["provenance"]["models"]
    assert set(models) == {"pretrained", "rot90", "rot180", "head:rot90", "head:rot180"}
    assert models["rot90"] == original == models["head:rot90"]  # the zoo's heads live in the task files
    assert models["rot180"] == digest.file_digest(zoo_copy / "rot180.safetensors")
    assert models["pretrained"] == digest.file_digest(zoo_copy / "pretrained.safetensors")
    on_disk = json.loads((tmp_path / "clean" / "metrics.json").read_text())
    assert on_disk["provenance"]["models"] == models
    # rot180's weights under rot90's key: the key matches, the content does not
    _resave(target, load_file(str(zoo_copy / "rot180.safetensors")), target)
    assert digest.file_digest(target) != original
    swapped = _run(tmp_path / "swapped")
    assert "rebuilding it" in caplog.text
    assert digest.file_digest(target) == original  # rebuilt: the same bytes as the zoo built
    assert swapped["acc"] == clean["acc"] and swapped["provenance"]["models"] == models


def test_resume_refuses_changed_task_model(zoo_copy, tmp_path, run_main):
    out = tmp_path / "run"
    _run(out)
    target = zoo_copy / "rot90.safetensors"
    old = digest.file_digest(target)
    # a legitimately different rot90 model (e.g. rebuilt elsewhere): new weights, index updated
    sd = load_file(str(target))
    name = next(k for k in sd if k != "head" and sd[k].is_floating_point())
    sd[name] = sd[name] + 0.01 * torch.ones_like(sd[name])
    _resave(target, sd, target)
    new = digest.file_digest(target)
    index = json.loads((zoo_copy / "digests.json").read_text())
    index[target.name] = new
    (zoo_copy / "digests.json").write_text(json.dumps(index))
    before = (out / "metrics.json").read_bytes()
    rc, _, err = run_main(*RUN, f"out_dir={out}", "resume=true")
    line = one_error(err, 2, rc, "task 'rot90'")
    assert f"{old[:12]} then, {new[:12]} now" in line
    assert (out / "metrics.json").read_bytes() == before  # nothing removed before the refusal
