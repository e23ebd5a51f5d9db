"""Hydra entry point: compose -> run_experiment -> metrics dict.

python -m otmf_exp.run                              # offline digits8 suite
python -m otmf_exp.run task_seq=vit8 alpha=0.8      # ViT-B/32 on TA8 (needs the hub)
python -m otmf_exp.run -m method=averaging,task_arithmetic
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from otmf_exp.config import check_registry, register_configs
from otmf_exp.errors import EXIT_USER_ERROR, UserError
from otmf_exp.reporting.summary import print_summary
from otmf_exp.runner import run_experiment

log = logging.getLogger("otmf_exp")
register_configs()


def _out_dir(cfg: DictConfig) -> Path:
    if cfg.out_dir:
        return Path(cfg.out_dir)
    return Path(HydraConfig.get().runtime.output_dir)


@hydra.main(version_base="1.3", config_path="pkg://otmf_exp.conf", config_name="run")
def _main(cfg: DictConfig) -> Any:
    try:
        result = run_experiment(cfg, _out_dir(cfg))
    except UserError as e:
        log.error("error: %s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    print_summary(result)
    return result["acc"]


def main() -> None:
    """Console script ``otmf-exp`` (= ``python -m otmf_exp.run``)."""
    try:
        check_registry()  # a method YAML without a registered class (or the reverse): one line, not Hydra's
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    _main()


if __name__ == "__main__":
    main()
