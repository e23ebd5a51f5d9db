"""AdaMerging (Yang et al., ICLR 2024) and its continual variants (pairwise, current-only = MINGLE's
C. AdaMerging, AdaMerging++): ``adamerging.py`` the method, ``adamerging_pools.py`` streams, seed pools and pruning.
The coefficient algebra it shares with Concrete is ``merging/adaptation.py``.

No imports here: the registry (``merging/__init__.py``) names each method's module."""
