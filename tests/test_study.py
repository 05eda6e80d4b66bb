"""`make study` on the tiny preset: both tracks, two objectives, one seed; point files, the report
from them, resume, the vader-preference data task and bad study configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline import data
from pipeline.config import ConfigError
from pipeline.runstore import RunStore


def study_config(tiny_config: Any, tmp_path: Path, *extra: str) -> Any:
    return tiny_config(
        "data.task=vader-preference",
        "data.num_train_pairs=16",
        "evaluate.num_human_pairs=8",
        "study.objectives=[dpo, learnable]",
        "study.seeds=[0]",
        "study.online={data: {task: vader-sentiment}}",
        f"study.publish_dir={tmp_path / 'docs' / 'study'}",
        *extra,
    )


def test_vader_preference_pairs_are_disjoint_from_held_out(tiny_config: Any) -> None:
    from stages import prepare

    cfg = tiny_config("data.task=vader-preference", "data.num_train_pairs=32")
    prepare.run(cfg, RunStore(cfg))
    folder = RunStore(cfg).stage_dir("prepare")
    train = data.read_rows(folder / "preference.parquet")
    held = data.read_rows(folder / "human_pairs.parquet")
    assert len(train) == 32 and len(held) == cfg.data.num_human_pairs
    texts = lambda rows: {r[s] for r in rows for s in ("chosen", "rejected")}  # noqa: E731
    assert not texts(train) & texts(held)
    for r in train:  # the more positive snippet preferred, clearly separated
        assert r["chosen_rating"] - r["rejected_rating"] >= cfg.data.human_pair_min_gap
    # By construction: the snippet splits share no id, and training leaves out held-out texts.
    splits = data.split_snippets(data.load_vader_snippets(), cfg.data.split_seed)
    assert not {s.id for s in splits["train"]} & {s.id for s in splits["test"]}
    pairs = data.training_pairs(splits, 1.0, 4000, 0)
    assert not texts(pairs) & {s.text for s in splits["test"]}


def test_study_end_to_end_and_resume(tiny_config: Any, tmp_path: Path) -> None:
    from stages import study as study_stage

    cfg = study_config(tiny_config, tmp_path)
    study_stage.run(cfg, RunStore(cfg), command="pytest")
    folder = tmp_path / "docs" / "study"
    names = sorted(p.name for p in folder.glob("*.json"))
    assert names == [
        "offline-dpo-s0.json",
        "offline-learnable-s0.json",
        "online-dpo-s0.json",
        "online-learnable-s0.json",
    ]
    off = json.loads((folder / "offline-learnable-s0.json").read_text())
    m = off["metrics"]
    assert m["heldout_pairs"] == 8
    assert m["heldout_accuracy_low"] <= m["heldout_accuracy"] <= m["heldout_accuracy_high"]
    assert off["config"]["train"]["objective"] == "learnable"
    assert off["config"]["objective_hparams"]["init"] == "dpo"
    assert off["training"]["steps"] == len(off["training"]["loss"]) > 0
    assert off["training"]["prior_parameters"]  # where gamma & co. started and ended
    assert off["machine"]["cores"] and off["command"] == "pytest"
    on = json.loads((folder / "online-dpo-s0.json").read_text())
    assert on["metrics"]["reward_ci_low"] <= on["metrics"]["reward_mean"]
    assert on["run"] == "tiny-on-dpo-s0" and "evaluate" in on["stage_seconds"]

    report = (tmp_path / "docs" / "study.md").read_text()
    assert "## Offline track" in report and "## Online track" in report
    assert "Learnable prior vs DPO" in report
    for png in ("offline_accuracy.png", "offline_loss.png", "online_reward_kl.png"):
        assert (folder / png).stat().st_size > 0 and f"study/{png}" in report

    # Resume: nothing is recomputed (the point files and every stage output stay as they were).
    stamps = {p: p.stat().st_mtime_ns for p in folder.glob("*.json")}
    manifests = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("tiny*/*/manifest.json")}
    study_stage.run(cfg, RunStore(cfg), command="pytest")
    assert {p: p.stat().st_mtime_ns for p in folder.glob("*.json")} == stamps
    assert {p: p.stat().st_mtime_ns for p in manifests} == manifests

    # The report comes from the point files alone: regenerated with the run store gone.
    import shutil

    shutil.rmtree(tmp_path / "runs")
    (tmp_path / "docs" / "study.md").unlink()
    study_stage.run(cfg, None, report_only=True)  # type: ignore[arg-type]
    assert (tmp_path / "docs" / "study.md").read_text() == report


def test_bad_study_configs(tiny_config: Any, tmp_path: Path) -> None:
    from pipeline import study
    from stages import study as study_stage

    with pytest.raises(ConfigError, match=r"study\.objectives: .*unknown objective 'nope'"):
        tiny_config("study.objectives=[dpo, nope]")
    with pytest.raises(ConfigError, match=r"study\.objectives: .*data loop"):
        tiny_config("study.objectives=[dice]")
    with pytest.raises(ConfigError, match=r"study\.seeds: .*twice"):
        tiny_config("study.seeds=[1, 1]")
    cfg = study_config(tiny_config, tmp_path)
    with pytest.raises(ConfigError, match="STUDY_POINTS: unknown objective 'dop'"):
        study.select_objectives(cfg.study, "dpo dop")
    assert study.select_objectives(cfg.study, " simpo ") == ["simpo"]
    # The offline track needs pairs from the data; the online track samples its own.
    with pytest.raises(ConfigError, match="offline track trains on pairs from the data"):
        study_stage.run(tiny_config(), None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="online track samples its own pairs"):
        study.track_config(study_config(tiny_config, tmp_path, "study.online={}"), "online")
    with pytest.raises(ConfigError, match=r"study\.online: .*data\.nope: unknown key"):
        study.track_config(
            study_config(tiny_config, tmp_path, "study.online={data: {nope: 1}}"), "online"
        )
    with pytest.raises(ConfigError, match="no study point files"):
        study_stage.run(cfg, None, report_only=True)  # type: ignore[arg-type]
    bad = tmp_path / "docs" / "study" / "offline-dpo-s0.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="offline-dpo-s0.json: not a study point file"):
        study_stage.run(cfg, None, report_only=True)  # type: ignore[arg-type]


def test_a_point_that_never_trained_is_reported_as_such() -> None:
    """A loss of log 2 at every step (a zero margin: e.g. SparsePO's learned masks all 0) is
    named in the findings, and its degenerate interval does not count as a resolution."""
    import math

    from pipeline import study

    def point(seed: int, losses: list[float], low: float, high: float) -> dict[str, Any]:
        metrics = {
            "heldout_accuracy": (low + high) / 2,
            "heldout_accuracy_low": low,
            "heldout_accuracy_high": high,
            "likelihood_displacement": False,
            "chosen_shift": 0.0,
        }
        return {"seed": seed, "training": {"loss": losses}, "metrics": metrics}

    stuck = point(1, [math.log(2)] * 4, 0.5, 0.5)
    moving = point(0, [math.log(2), 0.6, 0.5, 0.4], 0.6, 0.75)
    assert study.never_trained(stuck) and not study.never_trained(moving)
    lines = study.offline_findings({"sparsepo": [moving, stuck]})
    assert any(x.startswith("Never trained: sparsepo (seed 1)") for x in lines), lines
    assert any("Interval widths are 0.150–0.150" in x for x in lines), lines
    online = {
        "seed": 0,
        "training": {"loss": [math.log(2)] * 3},
        "metrics": {"reward_ci_low": 0.1, "reward_ci_high": 0.2, "baseline_reward_mean": 0.15,
                    "kl": 0.0},
    }  # fmt: skip
    assert any(
        x.startswith("Never trained: sparsepo (seed 0)")
        for x in study.online_findings({"sparsepo": [online]})
    )
