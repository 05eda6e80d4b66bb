"""The project's offline defaults (``offline.env``), applied by entry points, never on import."""

from __future__ import annotations

import os
from pathlib import Path

ENV_FILE = Path(__file__).with_name("offline.env")


def offline_defaults() -> dict[str, str]:
    """``KEY ?= VALUE`` lines of offline.env (the Makefile reads the same file)."""
    out = {}
    for line in ENV_FILE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("?=")
            out[key.strip()] = value.strip()
    return out


def apply_offline_defaults() -> None:
    """Set each default that the environment does not already set."""
    for key, value in offline_defaults().items():
        os.environ.setdefault(key, value)
