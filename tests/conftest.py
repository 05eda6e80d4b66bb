"""Shared fixtures: tiny-preset configs rooted in temp folders, and an in-process stage runner."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest

# Offline, CPU-safe defaults for every test (the Makefile sets the same; this covers plain pytest).
for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_CPU_KVCACHE_SPACE": "1",
}.items():
    os.environ.setdefault(_k, _v)

from pipeline.config import RunConfig, load_config  # noqa: E402
from pipeline.runstore import RunStore  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.yaml"
DEMO = REPO / "configs" / "demo.yaml"

ConfigFactory = Callable[..., RunConfig]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model/data cache for the whole session (the tiny model is built once)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def tiny_config(tmp_path: Path, cache_dir: Path) -> ConfigFactory:
    """tiny_config("train.beta=0.2", ...) -> the tiny preset, run root in this test's tmp dir."""

    def make(*overrides: str) -> RunConfig:
        # Test inputs (models, data files) live in the test's tmp dir, outside the run root.
        base = [
            f"root={tmp_path / 'runs'}",
            f"cache_dir={cache_dir}",
            f"allowed_roots=[{tmp_path}]",
        ]
        return load_config(TINY, [*base, *overrides])

    return make


def run_stage(cfg: RunConfig, stage: str, force: bool = False) -> None:
    """Run one stage in-process, as `python -m stages.<stage>` would."""
    importlib.import_module(f"stages.{stage}").run(cfg, RunStore(cfg), force)


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> RunConfig:
    """A tiny run whose prepare stage has run: read its outputs, don't write into it."""
    root = tmp_path_factory.mktemp("prepared")
    cfg = load_config(TINY, [f"root={root / 'runs'}", f"cache_dir={cache_dir}"])
    run_stage(cfg, "prepare")
    return cfg
