"""The task-vector family, data-free: ``averaging.py``, ``task_arithmetic.py`` (Ilharco et al., ICLR 2023),
``ties.py`` (Yadav et al., NeurIPS 2023), ``magmax.py`` (Marczak et al., ECCV 2024), ``tsvm.py`` (TSV-Merge,
Gargiulo et al., CVPR 2025), ``consensus.py`` (Consensus TA / TALL masks, Wang et al., ICML 2024).

No imports here: the registry (``merging/__init__.py``) names each method's module."""
