"""Shared helpers for the real-backbone tests: one tiny hub-like tree per test session.

Imported by test_backbones_*.py / test_heads.py (``from _hub_fixtures import ...``). The tree is
built once per process (module-level cache), under a pytest temp dir; every test gets its own
``$OTMF_EXP_CACHE`` so zero-shot heads never leak between tests or into ``~/.cache``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from otmf_exp.config import BackboneConfig

VISION = ["mnist", "pcam", "svhn", "fer2013", "cifar100", "food101"]
GLUE = ["cola", "mnli", "stsb"]
OPENCLIP_LAYOUTS = {"mnist": "pt", "pcam": "tv", "svhn": "safetensors", "fer2013": "pickled"}
_BUILT: dict[str, Path] = {}


@pytest.fixture(scope="session")
def hub_root(tmp_path_factory) -> Path:
    """``<root>`` holding tiny CLIP / open_clip / Flan-T5 models and datasets in the hub layout."""
    if "root" not in _BUILT:
        from otmf_exp.offline import tiny_hub

        root = tmp_path_factory.mktemp("tiny_hub")
        tiny_hub.build_hf_clip(root, VISION)
        tiny_hub.build_vision_datasets(root, VISION)
        tiny_hub.build_t5(root, GLUE)
        tiny_hub.build_glue_datasets(root, GLUE)
        tiny_hub.build_open_clip(root, list(OPENCLIP_LAYOUTS), layouts=OPENCLIP_LAYOUTS)
        _BUILT["root"] = root
    else:  # registered per process; re-register in case another test reset open_clip's registry
        from otmf_exp.offline import tiny_hub

        tiny_hub.openclip_config(_BUILT["root"])
    return _BUILT["root"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest single-threaded (and do not stall when another process holds a core)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OTMF_EXP_CACHE", str(tmp_path / "otmf_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def backbone_cfg(**kw):
    """A structured ``BackboneConfig`` (as composed from YAML) with ``kw`` set."""
    cfg = OmegaConf.structured(BackboneConfig)
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def clip_cfg(root: Path, **kw):
    from otmf_exp.offline import tiny_hub

    return backbone_cfg(
        **{
            "name": "clip_vit_b32",
            "kind": "hf_clip",
            "model_id": tiny_hub.CLIP_ID,
            "finetuned": tiny_hub.CLIP_FT,
            "local_dir": str(root),
            **kw,
        }
    )


def t5_cfg(root: Path, **kw):
    from otmf_exp.offline import tiny_hub

    return backbone_cfg(
        **{
            "name": "flan_t5_base",
            "kind": "hf_t5",
            "model_id": tiny_hub.T5_ID,
            "finetuned": tiny_hub.T5_FT,
            "finetuned_lora": tiny_hub.T5_LORA,
            "local_dir": str(root),
            **kw,
        }
    )


def openclip_cfg(root: Path, **kw):
    from otmf_exp.offline import tiny_hub

    return backbone_cfg(
        **{
            "name": "openclip_vit_b32",
            "kind": "open_clip",
            "arch": str(root / f"{tiny_hub.OPENCLIP_ARCH}.json"),
            "pretrained_tag": None,
            "model_id": tiny_hub.OPENCLIP_ID,
            "local_dir": str(root),
            "checkpoint_dir": str(root / "checkpoints"),
            **kw,
        }
    )


def openclip_overrides(root: Path, *tasks: str) -> list[str]:
    """CLI overrides of a vit8 run on the tiny open_clip hub fixture (task_order = ``tasks``)."""
    from otmf_exp.offline import tiny_hub

    return [
        "task_seq=vit8",
        "backbone=openclip_vit_b32",
        f"backbone.arch={root / f'{tiny_hub.OPENCLIP_ARCH}.json'}",
        "backbone.pretrained_tag=null",
        f"backbone.model_id={tiny_hub.OPENCLIP_ID}",
        f"backbone.local_dir={root}",
        f"backbone.checkpoint_dir={root / 'checkpoints'}",
        f"task_seq.local_dir={root}",
        f"task_order=[{','.join(tasks or ('mnist', 'svhn'))}]",
        "backbone.num_workers=0",
    ]


def seq_cfg(name: str, kind: str, root: Path | None):
    return OmegaConf.create(
        {"name": name, "kind": kind, "tasks": [], "local_dir": str(root) if root else None}
    )


def run_cli(*overrides: str, env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    """``python -m otmf_exp.run <overrides>`` in a subprocess (offline, progress bars off)."""
    full_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "otmf_exp.run", "progress=false", *overrides],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


#: per-method knobs that keep an end-to-end run on tiny models to a second or two (applied when present)
FAST = {
    "iterations": 2,
    "steps": 2,
    "max_steps": 2,
    "epochs": 1,
    "batch_size": 4,
    "eval_batches": 1,
    "head_tuning.steps": 2,
    "head_tuning.batch_size": 4,
}


def supported_protocol(method: str) -> str:
    """``continual`` (the run default) when ``method`` supports it, else its first protocol (joint-only methods)."""
    from otmf_exp.merging import METHODS

    protocols = METHODS[method].protocols
    return "continual" if "continual" in protocols else protocols[0]


def fast_method_overrides(make_cfg, method: str, *base: str) -> list[str]:
    """Overrides that run ``method`` end to end quickly: a protocol it supports, and shrunken loops
    (only for keys its config actually has)."""
    cfg = make_cfg(*base, f"method={method}")
    absent = object()  # a key whose default is null (resolved per backbone, e.g. wemoe's max_steps) counts
    fast = [
        f"method.{k}={v}"
        for k, v in FAST.items()
        if OmegaConf.select(cfg.method, k, default=absent) is not absent
    ]
    return [f"protocol={supported_protocol(method)}", *fast]
