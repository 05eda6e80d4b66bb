"""make pipeline runs every stage in one process: the vLLM engine cached by generate (or score,
evaluate) must not stay alive beside training. The chain runner shuts it down before a stage
that does not use vLLM, and keeps it for one that may reuse it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline import generation
from pipeline.config import load_config
from stages.chain import VLLM_STAGES, run_stages
from tests.conftest import TINY


class _Core:
    def __init__(self) -> None:
        self.shut = 0

    def shutdown(self) -> None:
        self.shut += 1


class _CachedEngine:
    """What release_vllm_engine reads of a vLLM ``LLM``: llm_engine.engine_core.shutdown."""

    def __init__(self) -> None:
        self.llm_engine = type("Engine", (), {})()
        self.llm_engine.engine_core = _Core()


def test_chain_releases_the_engine_before_a_stage_without_vllm(
    tmp_path: Path, cache_dir: Path
) -> None:
    assert {"generate", "score", "evaluate"} == VLLM_STAGES
    cfg = load_config(TINY, [f"root={tmp_path / 'runs'}", f"cache_dir={cache_dir}"])
    engine: Any = _CachedEngine()
    generation._ENGINE.update(key="k", llm=engine)
    try:
        run_stages(cfg, ["prepare"])  # a stage that never samples
        assert generation.live_vllm_engine() is None
        assert engine.llm_engine.engine_core.shut == 1
        kept: Any = _CachedEngine()
        generation._ENGINE.update(key="k", llm=kept)
        run_stages(cfg, ["generate"])  # may reuse it (tiny: transformers backend)
        assert generation.live_vllm_engine() is kept
        assert kept.llm_engine.engine_core.shut == 0
    finally:
        generation._ENGINE.clear()
