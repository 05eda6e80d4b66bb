"""iterate: round configs chain the policies; round runs nest under the pipeline run in MLflow.

(A full `make iterate` runs generate, score and a DeepSpeed launch per round; the stages are
tested on their own, this checks the wiring between rounds.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.runstore import RunStore
from stages import iterate
from tests.conftest import ConfigFactory


def test_rounds_chain_policies(tiny_config: ConfigFactory, tmp_path: Path) -> None:
    cfg = tiny_config("train.objective=dice", "score.dice.enabled=true")
    first = iterate.round_config(cfg, 1, None)
    assert first.name == f"{cfg.name}-round1" and first.generate.model is None
    assert first.score.reference_model is None
    policy = tmp_path / "policy"
    second = iterate.round_config(cfg, 2, policy)
    assert second.name == f"{cfg.name}-round2"
    assert second.generate.model == str(policy.resolve())
    assert second.score.reference_model == str(policy.resolve())
    # everything else is the run's own config: same train section, same MLflow store
    assert second.train.model_dump() == cfg.train.model_dump()
    assert second.tracking.uri is not None and second.root == cfg.root
    # the train stage of round 2 starts from, and is referenced to, the previous policy
    store = RunStore(second)
    assert store.expected_hash("generate") != RunStore(first).expected_hash("generate")


def test_round_runs_nest_under_pipeline_run(
    tiny_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    from pipeline import tracking

    cfg = tiny_config()
    ids = [iterate.link_round_run(cfg, iterate.round_config(cfg, k, None), k) for k in (1, 2)]
    assert ids[0] != ids[1]
    parent = tracking.parent_run_id(cfg)
    for k, run_id in enumerate(ids, start=1):
        run = mlflow.get_run(run_id)
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert run.data.tags["midpo.round"] == str(k)
    # a round's stages report under its round run; rerunning keeps the same round run
    assert tracking.parent_run_id(iterate.round_config(cfg, 2, None)) == ids[1]
    assert iterate.link_round_run(cfg, iterate.round_config(cfg, 2, None), 2) == ids[1]

    monkeypatch.setenv("ROUNDS", "0")
    with pytest.raises(ConfigError, match="ROUNDS=0 must be >= 1"):
        iterate.rounds_from_env()
