"""Thin stage entry points: each wires library pieces from ``pipeline`` together.

Run one as ``python -m stages.<name> [--config FILE] [--force] [key=value ...]``, ``make <name>``
or ``midpo <name>``. Every entry point runs offline by default (``pipeline/offline.env``).
"""

from pipeline.offline import apply_offline_defaults

apply_offline_defaults()
