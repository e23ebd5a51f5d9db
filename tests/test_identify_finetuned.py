"""Backbone.identify_finetuned: the digests a task's load records, without reading its weights (what
resume uses to check the models of finished steps), for every backbone kind with files."""

from __future__ import annotations

import _hub_fixtures as fx
import pytest
import torch
from _hub_fixtures import clip_cfg, openclip_cfg, t5_cfg

from otmf_exp.models import build_backbone
from otmf_exp.runtime import digest

_one_thread = fx._one_thread
_private_cache = fx._private_cache
hub_root = fx.hub_root

CASES = {
    "hf_clip": (lambda root: clip_cfg(root), "mnist"),
    "hf_t5": (lambda root: t5_cfg(root), "cola"),
    "hf_t5 lora": (lambda root: t5_cfg(root, variant="lora"), "cola"),
    **{
        f"open_clip {layout}": (lambda root: openclip_cfg(root), task)
        for task, layout in fx.OPENCLIP_LAYOUTS.items()
        if layout
        != "pickled"  # refused at load (it must be converted first: tests/test_backbones_openclip.py)
    },
}


@pytest.mark.parametrize("case", list(CASES))
def test_identify_records_what_a_load_records_without_loading(hub_root, monkeypatch, case):
    make, task = CASES[case]
    bb = build_backbone(make(hub_root), torch.device("cpu"), progress=False)
    with digest.collecting() as loaded:
        bb.load_finetuned(task)
    monkeypatch.setattr(type(bb), "load_finetuned", lambda self, t: pytest.fail("weights were read"))
    with digest.collecting() as identified:
        bb.identify_finetuned(task)
    assert loaded and identified == loaded


def test_synthetic_backbone_has_nothing_to_identify():
    from otmf_exp.offline.synthetic import SyntheticBackbone

    bb = SyntheticBackbone("tiny", "cpu")
    with digest.collecting() as got:
        bb.identify_finetuned("task00")
        bb.load_finetuned("task00")
    assert got == []
