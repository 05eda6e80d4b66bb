"""Evaluation metrics against hand-computed values, and the evaluate stage on the tiny preset."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline import evaluation as ev
from pipeline.config import RunConfig, load_config
from pipeline.data import read_rows
from pipeline.runstore import StageError
from tests.conftest import TINY, run_stage


# -- pure metrics ------------------------------------------------------------------------------
def test_bootstrap_constant_and_two_point() -> None:
    assert ev.bootstrap_mean([2.0, 2.0, 2.0], 50).as_dict() == {
        "mean": 2.0,
        "low": 2.0,
        "high": 2.0,
    }
    # Means of 2 draws from {0, 1}: 0 (1/4), 0.5 (1/2), 1 (1/4). The 95% interval spans [0, 1];
    # the 40% interval (quantiles 0.3 and 0.7) sits inside the 0.5 mass.
    wide = ev.bootstrap_mean([0.0, 1.0], 4000, 0.95, seed=1)
    assert (wide.mean, wide.low, wide.high) == (0.5, 0.0, 1.0)
    narrow = ev.bootstrap_mean([0.0, 1.0], 4000, 0.40, seed=1)
    assert (narrow.low, narrow.high) == (0.5, 0.5)
    with pytest.raises(ValueError, match="no values"):
        ev.bootstrap_mean([])


def test_grouped_mean_is_a_mean_of_prompt_means() -> None:
    # Prompt means 2 and 5: 3.5, not the sample mean 3.
    assert ev.grouped_mean([[1.0, 3.0], [5.0]], 100).mean == pytest.approx(3.5)
    with pytest.raises(ValueError, match="prompt 1 has a NaN"):
        ev.grouped_mean([[1.0], [float("nan")]])


def test_win_rates_count_all_cross_pairs_and_half_ties() -> None:
    rates = ev.prompt_win_rates([[1.0, 3.0], [2.0], [3.0, 1.0]], [[2.0, 2.0], [2.0], [1.0]])
    # prompt 0: -1,-1,+1,+1 -> 0.5; prompt 1: tie -> 0.5; prompt 2: win, tie -> 0.75
    np.testing.assert_allclose(rates, [0.5, 0.5, 0.75])
    assert ev.win_rate(
        [[1.0, 3.0], [2.0], [3.0, 1.0]], [[2.0, 2.0], [2.0], [1.0]], 50
    ).mean == pytest.approx(1.75 / 3)
    with pytest.raises(ValueError, match="2 policy prompts but 1 baseline"):
        ev.prompt_win_rates([[1.0], [2.0]], [[1.0]])


def test_sequence_kl_estimators() -> None:
    est = ev.sequence_kl([-1.0, -2.0], [-2.0, -2.0], [2, 3])
    assert est.k1 == pytest.approx(0.5)  # log ratios 1 and 0
    # k3 = mean((rho - 1) - log rho), rho = ref/pi = e^-1 and 1
    assert est.k3 == pytest.approx((math.exp(-1) - 1 + 1 + 0.0) / 2)
    assert est.per_token == pytest.approx(1 / 5)
    same = ev.sequence_kl([-3.0, -4.0], [-3.0, -4.0], [1, 1])
    assert (same.k1, same.k3) == (0.0, 0.0)


def test_distinct_n() -> None:
    texts = ["a b a b", "a b c"]
    assert ev.distinct_n(texts, 1) == pytest.approx(3 / 7)
    # bigrams: ab ba ab | ab bc -> 5 total, 3 distinct
    assert ev.distinct_n(texts, 2) == pytest.approx(3 / 5)
    assert ev.distinct_n(["one"], 2) == 0.0


def test_pair_agreement_and_displacement() -> None:
    # shifts (log pi - log ref): chosen [1, -1, 0], rejected [0, -3, 0]
    agree = ev.pair_agreement(
        policy_chosen=[-1.0, -3.0, -5.0],
        ref_chosen=[-2.0, -2.0, -5.0],
        policy_rejected=[-2.0, -4.0, -7.0],
        ref_rejected=[-2.0, -1.0, -7.0],
        beta=0.1,
    )
    # margins 0.1*(1-0)=0.1, 0.1*(-1+3)=0.2, 0 (tie counts 1/2)
    assert agree.accuracy == pytest.approx(2.5 / 3)
    assert agree.margin == pytest.approx(0.1)
    assert agree.chosen_shift == pytest.approx(0.0)
    assert agree.rejected_shift == pytest.approx(-1.0)
    assert agree.chosen_decreased == pytest.approx(1 / 3)
    # An untrained policy (pi = ref) is at chance, not 0.
    untrained = ev.pair_agreement([-1.0], [-1.0], [-2.0], [-2.0], beta=0.5)
    assert (untrained.accuracy, untrained.margin) == (0.5, 0.0)


def test_likelihood_accuracy_is_per_token() -> None:
    # per-token: chosen -2, -2, -1 vs rejected -3, -3, -1 -> win, win, tie
    acc = ev.likelihood_accuracy([-4.0, -2.0, -1.0], [-3.0, -6.0, -2.0], [2, 1, 1], [1, 2, 2])
    assert acc == pytest.approx(2.5 / 3)


def test_differential_information_entropy() -> None:
    # prompt 0: equal log ratios -> uniform q -> log 2 (normalised 1)
    # prompt 1: log ratios log 3 and 0 -> q = (3/4, 1/4)
    # prompt 2: one sample -> skipped
    h1 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    mean_h, mean_norm = ev.differential_information_entropy(
        [[-1.0, -2.0], [math.log(3) - 5.0, -5.0], [-1.0]],
        [[-3.0, -4.0], [-5.0, -5.0], [-2.0]],
    )
    assert mean_h == pytest.approx((math.log(2) + h1) / 2)
    assert mean_norm == pytest.approx((1.0 + h1 / math.log(2)) / 2)
    assert all(math.isnan(v) for v in ev.differential_information_entropy([[0.0]], [[0.0]]))


def test_build_report_on_a_constructed_case() -> None:
    """The whole report from hand-made inputs: every headline number worked out by hand."""
    policy = ev.ModelSamples(
        rewards=[[1.0, 0.0], [0.5, 0.5]],
        lengths=[[2, 2], [3, 1]],
        texts=[["good film", "bad film"], ["good", "fine"]],
        logps=[[-1.0, -2.0], [-3.0, -3.0]],
        ref_logps=[[-2.0, -2.0], [-3.0, -4.0]],
    )
    baseline = ev.ModelSamples(
        rewards=[[0.0, 0.0], [0.5, 1.0]], lengths=[[1, 1], [1, 1]], texts=[["a", "b"], ["c", "d"]]
    )
    human = ev.PairLogps(
        policy_chosen=[-1.0, -5.0],
        policy_rejected=[-3.0, -4.0],
        ref_chosen=[-2.0, -5.0],
        ref_rejected=[-3.0, -3.0],
        chosen_lengths=[1, 1],
        rejected_lengths=[1, 1],
    )
    report = ev.build_report(
        policy,
        baseline,
        baseline_is_reference=True,
        human_pairs=human,
        train_pairs=None,
        beta=0.5,
        bootstrap_samples=100,
    )
    m = report["metrics"]
    assert m["reward_mean"] == pytest.approx(0.5)  # prompt means 0.5 and 0.5
    assert m["baseline_reward_mean"] == pytest.approx(0.375)  # 0 and 0.75
    assert m["reward_gain"] == pytest.approx(0.125)
    # prompt 0: (1 vs 0, 1 vs 0, 0 vs 0, 0 vs 0) -> 1, 1, .5, .5 -> 0.75
    # prompt 1: (.5 vs .5, .5 vs 1) twice -> .5, 0 -> 0.25
    assert m["win_rate"] == pytest.approx(0.5)
    assert m["kl"] == pytest.approx((1 + 0 + 0 + 1) / 4)  # log ratios 1, 0, 0, 1
    assert m["kl_per_token"] == pytest.approx(2 / 8)
    assert m["baseline_kl"] == 0.0
    assert m["length_mean"] == pytest.approx(2.0)
    assert m["distinct_1"] == pytest.approx(4 / 6)  # good film bad film good fine
    # human pairs: shifts chosen (1, 0), rejected (0, -1) -> margins .5, .5 -> accuracy 1
    assert (m["human_accuracy"], m["human_margin"]) == (1.0, pytest.approx(0.5))
    assert m["human_chosen_shift"] == pytest.approx(0.5)
    assert m["human_reference_logp_accuracy"] == pytest.approx(0.5)  # -2 > -3; -5 < -3
    # DID: prompt 0 q = softmax(1, 0); prompt 1 q = softmax(0, 1): the same entropy
    q = 1 / (1 + math.exp(-1))
    h = -(q * math.log(q) + (1 - q) * math.log(1 - q))
    assert m["did_entropy"] == pytest.approx(h)
    assert "train_accuracy" not in m


# -- the stages on the tiny preset --------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(
    tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, tiny_prepared: RunConfig
) -> RunConfig:
    """prepare -> generate -> score -> train -> evaluate -> promote on the tiny preset (prepare's
    output is the session's, copied: same config, so the run store takes it as up to date)."""
    root = tmp_path_factory.mktemp("pipeline")
    cfg = load_config(TINY, [f"root={root / 'runs'}", f"cache_dir={cache_dir}"])
    shutil.copytree(tiny_prepared.run_dir / "prepare", cfg.run_dir / "prepare")
    for stage in ("prepare", "generate", "score", "train", "evaluate", "promote"):
        run_stage(cfg, stage)
    return cfg


def _report(cfg: RunConfig) -> dict[str, Any]:
    return dict(json.loads((cfg.run_dir / "evaluate" / "report.json").read_text()))


def test_full_tiny_pipeline_ends_with_a_loadable_champion(tiny_run: RunConfig) -> None:
    import mlflow
    import pandas as pd

    from pipeline import tracking

    promotion = json.loads((tiny_run.run_dir / "promote" / "promotion.json").read_text())
    assert promotion["action"] == "registered" and promotion["version"] == "1"
    mlflow_mod = tracking.setup(tiny_run)
    name = tiny_run.promote.registered_model
    version = mlflow_mod.MlflowClient().get_model_version_by_alias(name, "champion")
    assert str(version.version) == "1"
    assert version.tags["midpo.gate"] == "passed" or promotion["gate"] == "failed"
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    out = model.predict(
        pd.DataFrame({"prompt": ["Continue this movie review: The film"]}),
        params={"max_new_tokens": 5},
    )
    assert len(out) == 1 and isinstance(out[0], str)
    # The evaluation is in MLflow under the pipeline's parent run, with its plots.
    eval_run = mlflow_mod.get_run(
        json.loads((tiny_run.run_dir / "evaluate" / "manifest.json").read_text())["mlflow_run_id"]
    )
    assert eval_run.data.tags["mlflow.parentRunId"] == tracking.parent_run_id(tiny_run)
    assert eval_run.data.metrics["reward_mean"] == pytest.approx(
        _report(tiny_run)["metrics"]["reward_mean"]
    )
    artifacts = {
        a.path for a in mlflow_mod.MlflowClient().list_artifacts(eval_run.info.run_id, "plots")
    }
    assert {
        "plots/reward_vs_kl.png",
        "plots/reward_histograms.png",
        "plots/training_curves.png",
    } <= artifacts


def test_report_matches_its_saved_samples(tiny_run: RunConfig) -> None:
    """The headline numbers recomputed from the saved samples (the stage's wiring)."""
    report = _report(tiny_run)
    folder = tiny_run.run_dir / "evaluate"
    pol = read_rows(folder / "policy_samples.parquet")
    base = read_rows(folder / "baseline_samples.parquet")
    assert len(pol) == len(base) == report["prompts"] == tiny_run.data.num_test_prompts
    assert all(len(r["responses"]) == tiny_run.evaluate.n for r in pol)
    m = report["metrics"]
    assert m["reward_mean"] == pytest.approx(np.mean([np.mean(r["rewards"]) for r in pol]))
    assert m["win_rate"] == pytest.approx(
        ev.prompt_win_rates([r["rewards"] for r in pol], [r["rewards"] for r in base]).mean()
    )
    log_ratios = [a - b for r in pol for a, b in zip(r["logps"], r["ref_logps"], strict=True)]
    assert m["kl"] == pytest.approx(np.mean(log_ratios))
    assert report["baseline"]["kind"] == "reference" and m["baseline_kl"] == 0.0
    # The scorer is the run's: VADER compound scores of the responses.
    from pipeline.rewards import vader_sentiment

    assert pol[0]["rewards"] == pytest.approx(
        vader_sentiment([pol[0]["prompt"]] * 2, pol[0]["responses"])
    )
    assert report["human_pairs"]["count"] == tiny_run.data.num_human_pairs
    assert 0.0 <= m["human_accuracy"] <= 1.0 and math.isfinite(m["train_chosen_shift"])
    assert (folder / "summary.txt").read_text().startswith("[evaluate] tiny:")


def test_champion_baseline_and_skip(
    tiny_run: RunConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    """Against the champion it just promoted (the same model), the policy ties exactly."""
    run_stage(tiny_run, "evaluate")  # up to date
    assert "up to date" in capsys.readouterr().err
    first = _report(tiny_run)
    cfg = tiny_run.model_copy(deep=True)
    cfg.evaluate.baseline = "champion"
    run_stage(cfg, "evaluate")
    report = _report(cfg)
    assert (report["baseline"]["kind"], report["baseline"]["version"]) == ("champion", "1")
    m = report["metrics"]
    assert m["win_rate"] == 0.5 and m["reward_gain"] == 0.0
    assert m["baseline_kl"] == pytest.approx(m["kl"], abs=1e-4)
    # The reference's pair log-probs came from the cache this time: the same numbers.
    assert report["human_pairs"] == first["human_pairs"]
    assert report["train_pairs"] == first["train_pairs"]


def test_missing_upstream_is_named(tiny_config: Any) -> None:
    cfg = tiny_config("name=nothing-here")
    with pytest.raises(StageError, match="stage 'prepare' has no complete output.*make prepare"):
        run_stage(cfg, "evaluate")


# -- frontier (the driver's own logic; each point runs the stages tested above) ------------------
def test_frontier_points_and_outputs(tiny_config: Any, tmp_path: Path) -> None:
    from pipeline.config import ConfigError
    from stages import frontier

    assert frontier.parse_points("dpo:0.05,0.1 simpo:2") == {"dpo": [0.05, 0.1], "simpo": [2.0]}
    for bad, why in (
        ("dpo", "objective:beta"),
        ("nope:1", "unknown objective 'nope'"),
        ("dpo:x", "must be numbers"),
        ("dpo:0", "must be > 0"),
    ):
        with pytest.raises(ConfigError, match=why):
            frontier.parse_points(bad)
    point = frontier.point_config(tiny_config(), "simpo", 2.5)
    assert (point.name, point.train.objective, point.train.beta) == (
        "tiny-simpo-b2.5",
        "simpo",
        2.5,
    )
    with pytest.raises(ConfigError, match="remove train.objective_args.beta"):
        frontier.point_config(
            tiny_config("train.objective_args={beta: 0.2}", "train.beta=null"), "dpo", 0.1
        )

    rows = [
        frontier.point_row(
            obj,
            beta,
            f"r-{obj}-{beta}",
            {
                "metrics": {
                    "reward_mean": reward,
                    "reward_ci_low": reward - 0.1,
                    "reward_ci_high": reward + 0.1,
                    "kl": kl,
                    "kl_per_token": kl / 10,
                    "win_rate": 0.6,
                    "baseline_reward_mean": 0.1,
                    "length_mean": 10.0,
                    "distinct_2": 0.9,
                }
            },
        )
        for obj, beta, reward, kl in (
            ("dpo", 0.1, 0.4, 2.0),
            ("dpo", 0.5, 0.2, 0.5),
            ("simpo", 2.0, 0.3, 1.0),
        )
    ]
    files = frontier.write_outputs(tmp_path / "frontier", rows, "test")
    assert [f.name for f in files] == ["frontier.png", "frontier.json", "frontier.csv"]
    csv_lines = (tmp_path / "frontier" / "frontier.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and csv_lines[1].startswith("dpo,0.1,r-dpo-0.1,0.4,")
    assert "reference reward 0.100" in frontier.table_text(rows)
