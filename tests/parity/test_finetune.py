"""Parity rows of ``otmf_exp.parity.finetune`` against FusionBench 0.2.33 (needs ``.venv-parity``; marker parity)."""

from __future__ import annotations

import pytest

from ._rows import check_rows, zoo_dir  # noqa: F401

pytestmark = pytest.mark.parity


def test_finetune_rows_within_their_bounds(zoo_dir, tmp_path):  # noqa: F811
    check_rows("finetune", zoo_dir, tmp_path)
