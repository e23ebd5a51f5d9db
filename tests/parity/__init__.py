"""Tests of the parity framework (otmf_exp.parity): the diff and report logic, and that a row can fail."""
