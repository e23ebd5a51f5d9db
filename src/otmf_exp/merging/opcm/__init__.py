"""OPCM, orthogonal-projection continual merging (Tang et al., "Merging Models on the Fly Without Retraining"): ``opcm.py``.

No imports here: the registry (``merging/__init__.py``) names each method's module."""
