"""Evaluation metrics against hand-computed values, and the evaluate stage on the tiny preset."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline import evaluation as ev


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
