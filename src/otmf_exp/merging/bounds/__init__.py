"""The two reference rows of every table: ``pretrained.py`` (θ₀, zero-shot) and ``individual.py`` (each
task's own fine-tuned model).

No imports here: the registry (``merging/__init__.py``) names each method's module."""
