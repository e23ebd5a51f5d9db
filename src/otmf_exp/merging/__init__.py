"""Merging methods: pure tensor maths, one subpackage per family, and the explicit registry.

Layout: ``merging/<family>/<name>.py`` holds method ``<name>`` (config option = module name = W&B
``method``), its config and the family's private helpers; the top level holds only what several
families share: ``base.py`` (the contract), ``task_vectors.py`` (the algebra), ``sparsify.py``
(TIES trimming / sign election), ``adaptation.py`` (seed samples, entropy, coefficients),
``lora_moe.py`` (MINGLE's and WEMoE's LoRA experts) and this registry. A family never imports
another family's modules (``tests/test_house.py``).

To add a method: write ``merging/<family>/<name>.py`` (a new family is a folder with an
``__init__.py``) with a ``MergeMethod`` subclass (``name``, ``Config`` dataclass, ``step``), add
one line to :data:`METHODS`, and one YAML ``conf/method/<name>.yaml``.
"""

from __future__ import annotations

from otmf_exp.merging.adamerging.adamerging import AdaMerging
from otmf_exp.merging.base import ContinualState, MergeMethod, MethodContext, TaskInput
from otmf_exp.merging.bounds.individual import Individual
from otmf_exp.merging.bounds.pretrained import Pretrained
from otmf_exp.merging.concrete.concrete import Concrete
from otmf_exp.merging.dop.dop import DOP
from otmf_exp.merging.finetune.continual_finetune import ContinualFinetune
from otmf_exp.merging.fisher_regmean.fisher import Fisher
from otmf_exp.merging.fisher_regmean.regmean import RegMean
from otmf_exp.merging.mingle.mingle import MINGLE
from otmf_exp.merging.opcm.opcm import OPCM
from otmf_exp.merging.otmf.otmf import OTMF
from otmf_exp.merging.task_arithmetic.averaging import Averaging
from otmf_exp.merging.task_arithmetic.consensus import Consensus
from otmf_exp.merging.task_arithmetic.magmax import MagMax
from otmf_exp.merging.task_arithmetic.task_arithmetic import TaskArithmetic
from otmf_exp.merging.task_arithmetic.ties import Ties
from otmf_exp.merging.task_arithmetic.tsvm import TSVM
from otmf_exp.merging.wemoe.wemoe import WEMoE

METHODS: dict[str, type[MergeMethod]] = {
    "pretrained": Pretrained,
    "individual": Individual,
    "averaging": Averaging,
    "task_arithmetic": TaskArithmetic,
    "ties": Ties,
    "adamerging": AdaMerging,
    "concrete": Concrete,
    "magmax": MagMax,
    "opcm": OPCM,
    "dop": DOP,
    "otmf": OTMF,
    "mingle": MINGLE,
    "consensus": Consensus,
    "tsvm": TSVM,
    "fisher": Fisher,
    "regmean": RegMean,
    "continual_finetune": ContinualFinetune,
    "wemoe": WEMoE,
}

__all__ = ["METHODS", "ContinualState", "MergeMethod", "MethodContext", "TaskInput"]
