"""Evaluation metrics: pure numpy functions of rewards, log-probs and texts.

Everything here is deterministic given its inputs (the bootstrap takes a seed) so the tests
check each metric against values worked out by hand. ``pipeline.evaluation_steps`` gathers the
inputs (samples, rewards, sequence log-probs under the policy and the reference) and calls these.

Conventions: a "sequence log-prob" is the sum of per-token log-probs of the response tokens
only (prompt and padding never count). Groups are per prompt: ``list[array]`` with one array of
K values per prompt (K may differ between prompts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

Groups = Sequence[Sequence[float]]


@dataclass(frozen=True)
class Interval:
    """A point estimate with a bootstrap confidence interval."""

    mean: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _as_groups(groups: Groups, what: str) -> list[np.ndarray]:
    out = [np.asarray(g, dtype=np.float64).reshape(-1) for g in groups]
    if not out:
        raise ValueError(f"{what}: no prompts")
    for i, g in enumerate(out):
        if g.size == 0:
            raise ValueError(f"{what}: prompt {i} has no values")
        if not np.all(np.isfinite(g)):
            raise ValueError(f"{what}: prompt {i} has a NaN or infinite value")
    return out


def bootstrap_mean(
    values: Sequence[float] | np.ndarray,
    num_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Mean with a percentile-bootstrap interval (resampling ``values`` with replacement).

    Quantiles use numpy's default linear interpolation between bootstrap means.
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("bootstrap_mean: no values")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(num_samples, x.size))
    means = x[idx].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(float(x.mean()), float(low), float(high))


def grouped_mean(
    groups: Groups, num_samples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> Interval:
    """Mean over prompts of each prompt's mean, bootstrapped over prompts.

    Samples of one prompt are correlated; resampling prompts (not samples) keeps the interval
    honest about that.
    """
    per_prompt = [float(g.mean()) for g in _as_groups(groups, "grouped_mean")]
    return bootstrap_mean(per_prompt, num_samples, confidence, seed)


def prompt_win_rates(policy: Groups, baseline: Groups) -> np.ndarray:
    """Per prompt: the fraction of (policy sample, baseline sample) pairs the policy wins.

    A tie counts one half. Every policy sample is compared with every baseline sample of the
    same prompt, so K=2 against K=2 gives 4 comparisons per prompt.
    """
    pol = _as_groups(policy, "win rate (policy)")
    base = _as_groups(baseline, "win rate (baseline)")
    if len(pol) != len(base):
        raise ValueError(f"win rate: {len(pol)} policy prompts but {len(base)} baseline prompts")
    rates = []
    for p, b in zip(pol, base, strict=True):
        diff = p[:, None] - b[None, :]
        rates.append(float((diff > 0).mean() + 0.5 * (diff == 0).mean()))
    return np.asarray(rates)


def win_rate(
    policy: Groups,
    baseline: Groups,
    num_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Mean over prompts of :func:`prompt_win_rates`, bootstrapped over prompts."""
    return bootstrap_mean(prompt_win_rates(policy, baseline), num_samples, confidence, seed)


@dataclass(frozen=True)
class KLEstimate:
    """Monte-Carlo KL(pi || ref) from samples of pi (sequence level).

    ``k1`` = mean of log pi(y) - log ref(y): unbiased, can be negative on few samples.
    ``k3`` = mean of (rho - 1) - log rho with rho = ref(y)/pi(y): also unbiased, never negative,
    lower variance when pi and ref are close (Schulman's estimator).
    ``per_token`` = the k1 sum divided by the number of response tokens.
    """

    k1: float
    k3: float
    per_token: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def sequence_kl(
    policy_logps: Sequence[float], ref_logps: Sequence[float], lengths: Sequence[float]
) -> KLEstimate:
    """KL(pi || ref) from sequence log-probs of samples drawn from pi (one value per sample)."""
    lp = np.asarray(policy_logps, dtype=np.float64)
    lr = np.asarray(ref_logps, dtype=np.float64)
    n = np.asarray(lengths, dtype=np.float64)
    if not (lp.shape == lr.shape == n.shape) or lp.size == 0:
        raise ValueError(
            f"sequence_kl: need equal non-empty lengths, got {lp.size}, {lr.size}, {n.size}"
        )
    log_ratio = lp - lr
    # exp(-log_ratio) can overflow for wildly different models; clip at a ratio of e^50.
    rho = np.exp(np.clip(-log_ratio, -50.0, 50.0))
    tokens = float(n.sum())
    return KLEstimate(
        k1=float(log_ratio.mean()),
        k3=float(((rho - 1.0) + log_ratio).mean()),
        per_token=float(log_ratio.sum() / tokens) if tokens > 0 else 0.0,
    )


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n: unique word n-grams / all word n-grams over ``texts`` (whitespace words).

    0.0 when the texts have no n-gram at all.
    """
    if n < 1:
        raise ValueError(f"distinct_n: n must be >= 1, got {n}")
    total = 0
    seen: set[tuple[str, ...]] = set()
    for text in texts:
        words = text.split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


@dataclass(frozen=True)
class PairAgreement:
    """How well the implicit reward beta * log(pi/ref) ranks human-preferred over rejected.

    ``accuracy``: fraction of pairs with r(chosen) > r(rejected), ties count one half (an
    untrained policy, pi = ref, scores 0.5, not 0). ``margin``: mean r(chosen) - r(rejected).
    ``chosen_shift`` / ``rejected_shift``: mean log pi(y) - log ref(y), in nats, for each side
    (a negative ``chosen_shift`` is likelihood displacement: the preferred response became less
    likely even though it is preferred). ``chosen_decreased``: fraction of pairs where it fell.
    """

    count: int
    accuracy: float
    margin: float
    chosen_shift: float
    rejected_shift: float
    chosen_decreased: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def pair_agreement(
    policy_chosen: Sequence[float],
    ref_chosen: Sequence[float],
    policy_rejected: Sequence[float],
    ref_rejected: Sequence[float],
    beta: float,
) -> PairAgreement:
    """Implicit-reward agreement and likelihood displacement on preference pairs."""
    pw, rw, pl, rl = (
        np.asarray(a, dtype=np.float64)
        for a in (policy_chosen, ref_chosen, policy_rejected, ref_rejected)
    )
    if not (pw.shape == rw.shape == pl.shape == rl.shape) or pw.size == 0:
        raise ValueError("pair_agreement: need four equal, non-empty arrays")
    if beta <= 0:
        raise ValueError(f"pair_agreement: beta must be > 0, got {beta}")
    shift_w, shift_l = pw - rw, pl - rl
    margin = beta * (shift_w - shift_l)
    return PairAgreement(
        count=int(pw.size),
        accuracy=float((margin > 0).mean() + 0.5 * (margin == 0).mean()),
        margin=float(margin.mean()),
        chosen_shift=float(shift_w.mean()),
        rejected_shift=float(shift_l.mean()),
        chosen_decreased=float((shift_w < 0).mean()),
    )


def likelihood_accuracy(
    chosen_logps: Sequence[float],
    rejected_logps: Sequence[float],
    chosen_lengths: Sequence[int],
    rejected_lengths: Sequence[int],
) -> float:
    """Fraction of pairs where a model gives the chosen response the higher mean token log-prob.

    A reference point for :func:`pair_agreement`: how often the model's own likelihood (per
    token, so length does not decide) already agrees with the human preference.
    """
    cw = np.asarray(chosen_logps, dtype=np.float64) / np.maximum(np.asarray(chosen_lengths), 1)
    cl = np.asarray(rejected_logps, dtype=np.float64) / np.maximum(np.asarray(rejected_lengths), 1)
    if cw.shape != cl.shape or cw.size == 0:
        raise ValueError("likelihood_accuracy: need equal, non-empty arrays")
    return float((cw > cl).mean() + 0.5 * (cw == cl).mean())


def differential_information_entropy(
    policy_logps: Groups, ref_logps: Groups
) -> tuple[float, float]:
    """Entropy of q(y) proportional to pi(y)/ref(y) over each prompt's samples (Won et al. 2025).

    Per prompt with K >= 2 samples: q = softmax(log pi - log ref), H = -sum q log q. Returns the
    mean of H over prompts and the mean of H / log K (1.0 = uniform: the update spread
    probability evenly, "smoothing"; near 0 = concentrated on one sample, "reinforcing").
    Prompts with one sample carry no information and are skipped; (nan, nan) if none is left.
    """
    pol = _as_groups(policy_logps, "DID entropy (policy)")
    ref = _as_groups(ref_logps, "DID entropy (reference)")
    if len(pol) != len(ref):
        raise ValueError("DID entropy: policy and reference have different prompt counts")
    entropies, normalised = [], []
    for p, r in zip(pol, ref, strict=True):
        if p.shape != r.shape:
            raise ValueError("DID entropy: a prompt has different sample counts")
        if p.size < 2:
            continue
        z = p - r
        z = z - z.max()
        q = np.exp(z) / np.exp(z).sum()
        h = float(-(q[q > 0] * np.log(q[q > 0])).sum())
        entropies.append(h)
        normalised.append(h / math.log(p.size))
    if not entropies:
        return float("nan"), float("nan")
    return float(np.mean(entropies)), float(np.mean(normalised))


def length_stats(lengths: Sequence[float]) -> dict[str, float]:
    x = np.asarray(lengths, dtype=np.float64)
    if x.size == 0:
        raise ValueError("length_stats: no responses")
    return {"mean": float(x.mean()), "min": float(x.min()), "max": float(x.max())}


# -- the whole report from gathered inputs --------------------------------------------------------
@dataclass
class ModelSamples:
    """One model's samples on the held-out prompts, grouped per prompt.

    ``logps`` / ``ref_logps``: sequence log-probs of each sample under the model itself and under
    the reference (None when not computed, e.g. the baseline *is* the reference).
    """

    rewards: list[list[float]]
    lengths: list[list[int]]
    texts: list[list[str]]
    logps: list[list[float]] | None = None
    ref_logps: list[list[float]] | None = None


@dataclass
class PairLogps:
    """Sequence log-probs of preference pairs under the policy and the reference."""

    policy_chosen: list[float]
    policy_rejected: list[float]
    ref_chosen: list[float]
    ref_rejected: list[float]
    chosen_lengths: list[int]
    rejected_lengths: list[int]


def _flat(groups: Sequence[Sequence[float]]) -> list[float]:
    return [float(x) for g in groups for x in g]


def _side_report(s: ModelSamples, boot: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "reward": grouped_mean(s.rewards, **boot).as_dict(),
        "length_tokens": length_stats(_flat(s.lengths)),
        "distinct_1": distinct_n([t for g in s.texts for t in g], 1),
        "distinct_2": distinct_n([t for g in s.texts for t in g], 2),
        "samples": sum(len(g) for g in s.rewards),
    }
    if s.logps is not None and s.ref_logps is not None:
        out["kl"] = sequence_kl(_flat(s.logps), _flat(s.ref_logps), _flat(s.lengths)).as_dict()
        h, h_norm = differential_information_entropy(s.logps, s.ref_logps)
        out["did_entropy"] = h
        out["did_entropy_normalized"] = h_norm
    return out


def _pairs_report(p: PairLogps, beta: float) -> dict[str, float]:
    agreement = pair_agreement(
        p.policy_chosen, p.ref_chosen, p.policy_rejected, p.ref_rejected, beta
    )
    return {
        **agreement.as_dict(),
        "beta": beta,
        "policy_logp_accuracy": likelihood_accuracy(
            p.policy_chosen, p.policy_rejected, p.chosen_lengths, p.rejected_lengths
        ),
        "reference_logp_accuracy": likelihood_accuracy(
            p.ref_chosen, p.ref_rejected, p.chosen_lengths, p.rejected_lengths
        ),
    }


def build_report(
    policy: ModelSamples,
    baseline: ModelSamples,
    *,
    baseline_is_reference: bool,
    human_pairs: PairLogps | None,
    train_pairs: PairLogps | None,
    beta: float,
    bootstrap_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Every evaluation number, as report sections plus a flat ``metrics`` dict.

    ``metrics`` holds what MLflow logs and the promotion gate reads: reward_mean (policy),
    baseline_reward_mean, reward_gain, win_rate, kl (k1 estimator, nats per sequence), human
    pair accuracy and margins, likelihood displacement (``*_chosen_shift``), lengths,
    distinct-n and the DID entropy. A baseline that is the reference has KL 0 by definition.
    """
    boot: dict[str, Any] = {
        "num_samples": bootstrap_samples,
        "confidence": confidence,
        "seed": seed,
    }
    pol = _side_report(policy, boot)
    base = _side_report(baseline, boot)
    if "kl" not in base and baseline_is_reference:
        base["kl"] = KLEstimate(0.0, 0.0, 0.0).as_dict()
    wins = win_rate(policy.rewards, baseline.rewards, **boot).as_dict()
    report: dict[str, Any] = {"policy": pol, "baseline": base, "win_rate": wins}

    reward, base_reward = pol["reward"], base["reward"]
    nan = float("nan")
    m: dict[str, float] = {
        "reward_mean": reward["mean"],
        "reward_ci_low": reward["low"],
        "reward_ci_high": reward["high"],
        "baseline_reward_mean": base_reward["mean"],
        "reward_gain": reward["mean"] - base_reward["mean"],
        "win_rate": wins["mean"],
        "win_rate_ci_low": wins["low"],
        "win_rate_ci_high": wins["high"],
        "length_mean": pol["length_tokens"]["mean"],
        "baseline_length_mean": base["length_tokens"]["mean"],
        "distinct_1": pol["distinct_1"],
        "distinct_2": pol["distinct_2"],
        "baseline_distinct_2": base["distinct_2"],
    }
    for prefix, side in (("", pol), ("baseline_", base)):
        kl = side.get("kl")
        if isinstance(kl, dict):
            m[f"{prefix}kl"] = kl["k1"]
            m[f"{prefix}kl_k3"] = kl["k3"]
            m[f"{prefix}kl_per_token"] = kl["per_token"]
    m["did_entropy"] = float(pol.get("did_entropy", nan))
    m["did_entropy_normalized"] = float(pol.get("did_entropy_normalized", nan))
    for name, pairs in (("human", human_pairs), ("train", train_pairs)):
        if pairs is None or not pairs.policy_chosen:
            continue
        section = _pairs_report(pairs, beta)
        report[f"{name}_pairs"] = section
        m[f"{name}_accuracy"] = section["accuracy"]
        m[f"{name}_margin"] = section["margin"]
        m[f"{name}_chosen_shift"] = section["chosen_shift"]
        m[f"{name}_rejected_shift"] = section["rejected_shift"]
        m[f"{name}_chosen_decreased"] = section["chosen_decreased"]
        m[f"{name}_logp_accuracy"] = section["policy_logp_accuracy"]
        m[f"{name}_reference_logp_accuracy"] = section["reference_logp_accuracy"]
    report["metrics"] = m
    return report
