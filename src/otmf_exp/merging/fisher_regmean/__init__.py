"""The data-statistics family, joint: ``fisher.py`` (Matena & Raffel, NeurIPS 2022) and ``regmean.py``
(Jin et al., ICLR 2023): both weight each model by statistics gathered on its task's data.

No imports here: the registry (``merging/__init__.py``) names each method's module."""
