"""Concrete subspace learning (Tang et al., ICLR 2024): ``concrete.py``, a Concrete mask meta-learned over
task arithmetic or AdaMerging (FusionBench's ``concrete_subspace``).

No imports here: the registry (``merging/__init__.py``) names each method's module."""
