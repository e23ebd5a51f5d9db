"""DOP, data-free continual merging by dual projections (Tang et al.): ``dop.py``.

No imports here: the registry (``merging/__init__.py``) names each method's module."""
