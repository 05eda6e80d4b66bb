"""Thin stage entry points: each wires library pieces from ``pipeline`` together.

Run one as ``python -m stages.<name> [--config FILE] [--force] [key=value ...]`` or ``make <name>``.
"""
