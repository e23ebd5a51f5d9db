"""OTMF (Optimal-Transport-based Masked Fusion, arXiv 2511.19561): ``otmf.py`` the method, ``ot_fusion.py``
the masked fusion step, ``ot_masks.py`` the masks and their fused Adam, ``ot_diagnostics.py`` the per-step
OT diagnostics, ``head_tuning.py`` the optional classification-head tuning.

No imports here: the registry (``merging/__init__.py``) names each method's module."""
