"""Parity rows against code that is not a package (``make parity-authors``; not part of CI).

This module: continual Consensus TA against MINGLE's ``ContinualConsensusTAForCLIP`` (its defaults for
CLIP: λ 0.1, λ_t 0.2, k 2), after every one of the zoo's 8 steps. The AdaMerging presets against the
OTMF authors' scripts and MINGLE's C. AdaMerging are in :mod:`otmf_exp.parity.authors_adamerging`;
continual LoRA-WEMoE and ``mingle`` against MINGLE's ``c_wemoe.py`` and ``mingle.py`` are in
:mod:`otmf_exp.parity.authors_mingle`; OTMF's mask training against the authors' ``compute_sr_mask`` is
in :mod:`otmf_exp.parity.authors_otmf`.
"""

from __future__ import annotations

from dataclasses import replace

from otmf_exp.parity.core import F64_WHY, Case
from otmf_exp.parity.ours import steps_of

REF = "otmf_exp.parity.reference.authors"
SETTINGS = dict(scaling=0.1, tall_mask_lambda=0.2, k=2)

CONSENSUS = Case(
    name="consensus_continual_mingle",
    method="consensus",
    settings="continual, 8 tasks, λ=0.1, λ_t=0.2, k=2",
    reference="MINGLE fusion_bench/method/mingle/consensus_ta.py ContinualConsensusTAForCLIP",
    compared="merged weights, every step",
    bound=2e-6,
    why="float32 rounding: MINGLE accumulates θᵗ in weight space, we accumulate τᵐ; the float64 row agrees",
    ours=steps_of("consensus", "continual", **SETTINGS),
    theirs=f"{REF}:consensus_continual",
)
CASES: list[Case] = [
    CONSENSUS,
    replace(
        CONSENSUS,
        name="consensus_continual_mingle_f64",
        bound=1e-10,
        why=F64_WHY,
        ours=steps_of("consensus", "continual", dtype="float64", **SETTINGS),
        theirs=f"{REF}:consensus_continual_f64",
        dtype="float64",
    ),
]
