"""Continual fine-tuning (MINGLE's sequential-finetuning baseline, full or LoRA): ``continual_finetune.py``.

No imports here: the registry (``merging/__init__.py``) names each method's module."""
