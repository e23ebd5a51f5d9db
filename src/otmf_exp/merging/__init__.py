"""Merging methods: pure tensor maths, one file per method, and the explicit registry.

To add a method: write ``merging/<name>.py`` with a ``MergeMethod`` subclass (``name``,
``Config`` dataclass, ``step``), add one line to :data:`METHODS`, and one YAML
``conf/method/<name>.yaml``. The config option name = module name = W&B ``method``.
"""

from __future__ import annotations

from otmf_exp.merging.adamerging import AdaMerging
from otmf_exp.merging.averaging import Averaging
from otmf_exp.merging.base import ContinualState, MergeMethod, MethodContext, TaskInput
from otmf_exp.merging.concrete import Concrete
from otmf_exp.merging.consensus import Consensus
from otmf_exp.merging.continual_finetune import ContinualFinetune
from otmf_exp.merging.dop import DOP
from otmf_exp.merging.fisher import Fisher
from otmf_exp.merging.individual import Individual
from otmf_exp.merging.magmax import MagMax
from otmf_exp.merging.mingle import MINGLE
from otmf_exp.merging.opcm import OPCM
from otmf_exp.merging.otmf import OTMF
from otmf_exp.merging.pretrained import Pretrained
from otmf_exp.merging.regmean import RegMean
from otmf_exp.merging.task_arithmetic import TaskArithmetic
from otmf_exp.merging.ties import Ties
from otmf_exp.merging.tsvm import TSVM
from otmf_exp.merging.wemoe import WEMoE

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
