"""MINGLE (arXiv 2505.11883): ``mingle.py`` the method, ``mingle_config.py`` its options, ``mingle_tta.py``
the gate distillation and covariance pass. The LoRA-MoE it shares with WEMoE is ``merging/lora_moe.py``.

No imports here: the registry (``merging/__init__.py``) names each method's module."""
