"""Parity with the reference implementations: ``python -m otmf_exp.parity`` (``make parity``).

Import-free on purpose: the reference side imports ``otmf_exp.parity.reference.*`` in the FusionBench
venv, which has none of this project's other dependencies.
"""
