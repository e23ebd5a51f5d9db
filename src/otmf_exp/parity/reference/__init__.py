"""The reference side of parity: run in the FusionBench venv (torch, transformers, safetensors, fusion_bench).

Import-free; its modules import only those packages and :mod:`otmf_exp.parity.reference.zoo`.
"""
