"""TIS-DPO's contrastive token-weight estimator (run by the score stage).

Two contrastive models are trained first (one with DPO on the pairs, one with DPO on the reversed
pairs). Each response token gets a raw score from their log-prob difference,

    chosen:   log p_pos(y_t) - log p_neg(y_t)
    rejected: log p_neg(y_t) - log p_pos(y_t)

(the reference code computes one difference and negates it for the chosen side), rounded to two
decimals as the reference stores them, then a transform maps the scores of one response to weights.
The last response token (the EOS the training data appends) gets weight 0, as do prompt and
padding positions. Transforms and their defaults (reference ``config/transform/default.yaml``):

- ``binary`` (top_percent=100): 1 for the top `top_percent` % scores, else 0 (default method;
  with 100 % every token gets 1).
- ``threshold`` (upper_threshold=1, lower_threshold=-1): clamp.
- ``threshold_and_scale`` (min_val=-1.5, max_val=1.5, min_scale=0.7, max_scale=1.3): clamp, then
  map linearly onto [min_scale, max_scale].
- ``random`` (min_val=0.7, max_val=1.3): uniform weights (ablation).
- ``rank_based`` (min_scale=0.7, max_scale=1.3): linear in the score's rank (ties by position).
- ``origin``: the raw scores.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

TRANSFORM_DEFAULTS: dict[str, dict[str, float]] = {
    "origin": {},
    "binary": {"top_percent": 100.0},
    "threshold": {"upper_threshold": 1.0, "lower_threshold": -1.0},
    "threshold_and_scale": {"min_val": -1.5, "max_val": 1.5, "min_scale": 0.7, "max_scale": 1.3},
    "random": {"min_val": 0.7, "max_val": 1.3},
    "rank_based": {"min_scale": 0.7, "max_scale": 1.3},
}


def _binary(scores: Tensor, top_percent: float) -> Tensor:
    # Reference: sort descending, value -> 1 if its (last) index in that order < threshold, so tied
    # scores share one weight: 1 iff the count of scores >= the value is <= threshold.
    threshold = int(scores.numel() * top_percent / 100)
    at_least = (scores.unsqueeze(0) >= scores.unsqueeze(1)).sum(dim=1)
    return (at_least <= threshold).to(scores.dtype)


def _rank_based(scores: Tensor, min_scale: float, max_scale: float) -> Tensor:
    n = scores.numel()
    if n == 1:
        return torch.ones_like(scores)
    order = torch.sort(scores, stable=True).indices  # ascending, ties in position order
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(n, device=scores.device)
    return min_scale + ranks.to(scores.dtype) / (n - 1) * (max_scale - min_scale)


def transform_scores(
    scores: Tensor,
    method: str = "binary",
    params: Mapping[str, float] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Apply a TIS-DPO weight transform to the raw scores of one response (1-D)."""
    if method not in TRANSFORM_DEFAULTS:
        raise ValueError(
            f"transform: unknown {method!r}; expected one of {sorted(TRANSFORM_DEFAULTS)}"
        )
    given = dict(params or {})
    unknown = sorted(set(given) - set(TRANSFORM_DEFAULTS[method]))
    if unknown:
        raise ValueError(
            f"transform_params: unknown {unknown} for {method!r}; "
            f"expected {sorted(TRANSFORM_DEFAULTS[method])}"
        )
    p = {**TRANSFORM_DEFAULTS[method], **given}
    if scores.numel() == 0 or method == "origin":
        return scores.clone()
    if method == "binary":
        return _binary(scores, p["top_percent"])
    if method == "threshold":
        return scores.clamp(min=p["lower_threshold"], max=p["upper_threshold"])
    if method == "threshold_and_scale":
        clamped = scores.clamp(min=p["min_val"], max=p["max_val"])
        return p["min_scale"] + (clamped - p["min_val"]) * (p["max_scale"] - p["min_scale"]) / (
            p["max_val"] - p["min_val"]
        )
    if method == "random":
        uniform = torch.rand(scores.shape, generator=generator, dtype=scores.dtype)
        return p["min_val"] + uniform.to(scores.device) * (p["max_val"] - p["min_val"])
    return _rank_based(scores, p["min_scale"], p["max_scale"])


def contrastive_token_weights(
    positive_logps: Tensor,
    negative_logps: Tensor,
    mask: Tensor,
    *,
    side: str,
    transform: str = "binary",
    transform_params: Mapping[str, float] | None = None,
    zero_last_token: bool = True,
    round_decimals: int | None = 2,
    generator: torch.Generator | None = None,
) -> Tensor:
    """TIS-DPO token weights for one side of the pairs, [B, T] float32 (0 off the response).

    positive_logps / negative_logps [B, T]: per-token log-probs of the responses under the
    positive (DPO-trained) and negative (reverse-DPO-trained) contrastive models, aligned with
    ``mask`` [B, T] (response tokens). ``side`` is "chosen" or "rejected". With
    ``zero_last_token`` the last response token is treated as the appended EOS: weight 0 and left
    out of the transform (set False if responses carry no EOS).
    """
    if side not in ("chosen", "rejected"):
        raise ValueError(f"side: expected 'chosen' or 'rejected', got {side!r}")
    if positive_logps.shape != negative_logps.shape or positive_logps.shape != mask.shape:
        raise ValueError(
            "positive_logps, negative_logps, mask: expected equal [B, T] shapes, got "
            f"{tuple(positive_logps.shape)}, {tuple(negative_logps.shape)}, {tuple(mask.shape)}"
        )
    if positive_logps.dim() != 2:
        raise ValueError(f"positive_logps: expected [B, T], got {tuple(positive_logps.shape)}")
    mask = mask.bool()
    for name, values in (("positive_logps", positive_logps), ("negative_logps", negative_logps)):
        if not bool(torch.isfinite(values.masked_select(mask)).all()):
            raise ValueError(f"{name}: NaN/inf at response positions")
    difference = positive_logps.double() - negative_logps.double()
    scores = difference if side == "chosen" else -difference
    if round_decimals is not None:
        scores = torch.round(scores, decimals=round_decimals)
    weights = torch.zeros(mask.shape, dtype=torch.float64, device=mask.device)
    for row in range(mask.shape[0]):
        positions = mask[row].nonzero().flatten()
        if zero_last_token and positions.numel():
            positions = positions[:-1]
        if positions.numel() == 0:
            continue
        row_weights = transform_scores(
            scores[row, positions], transform, transform_params, generator
        )
        weights[row, positions] = row_weights
    return weights.float()
