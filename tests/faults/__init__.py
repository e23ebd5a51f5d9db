"""Fault-injection suite of issue 27 (item 8): shared fixtures in conftest.py, one module per class."""
