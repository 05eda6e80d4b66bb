"""TIS-DPO's contrastive token-weight estimator equals the reference data pipeline."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import torch

from pipeline.objectives import PairBatch, contrastive_token_weights, make_objective
from pipeline.objectives.tisdpo_weights import transform_scores


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny tensors: intra-op threads only add contention on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the reference transforms, written as plain Python over lists (preference_datasets.py) ----


def binary_ref(nums: list[float], top_percent: float = 100) -> list[float]:
    sorted_nums = sorted(nums, reverse=True)
    threshold_index = int(len(nums) * top_percent / 100)
    num_to_value = {num: 1 if i < threshold_index else 0 for i, num in enumerate(sorted_nums)}
    return [num_to_value[num] for num in nums]


def threshold_and_scale_ref(
    nums: list[float],
    min_val: float = -1.5,
    max_val: float = 1.5,
    min_scale: float = 0.7,
    max_scale: float = 1.3,
) -> list[float]:
    out = []
    for num in nums:
        num = max(min_val, min(max_val, num))
        out.append(min_scale + (num - min_val) * (max_scale - min_scale) / (max_val - min_val))
    return out


def rank_based_ref(
    nums: list[float], min_scale: float = 0.7, max_scale: float = 1.3
) -> list[float]:
    sorted_indices = sorted(range(len(nums)), key=lambda k: nums[k])
    result = []
    for i, _ in enumerate(sorted_indices):
        if len(nums) == 1:
            result.append(1.0)
        else:
            result.append(min_scale + (i / (len(nums) - 1)) * (max_scale - min_scale))
    return [result[sorted_indices.index(i)] for i in range(len(nums))]


def threshold_ref(nums: list[float], upper: float = 1.0, lower: float = -1.0) -> list[float]:
    return [upper if n > upper else lower if n < lower else n for n in nums]


def _scores(seed: int, n: int) -> list[float]:
    rng = random.Random(seed)
    return [round(rng.uniform(-3, 3), 1) for _ in range(n)]  # 1 decimal: many ties


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", [1, 2, 7, 30])
def test_transforms_match_reference(seed: int, n: int) -> None:
    nums = _scores(seed, n)
    x = torch.tensor(nums, dtype=torch.float64)

    def close(got: torch.Tensor, expected: list[float]) -> None:
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))

    close(transform_scores(x, "binary"), binary_ref(nums))
    for top in (25, 50, 75):
        close(transform_scores(x, "binary", {"top_percent": top}), binary_ref(nums, top))
    close(transform_scores(x, "threshold"), threshold_ref(nums))
    close(transform_scores(x, "threshold_and_scale"), threshold_and_scale_ref(nums))
    close(
        transform_scores(
            x,
            "threshold_and_scale",
            {"min_val": -2.0, "max_val": 2.0, "min_scale": 0.5, "max_scale": 1.5},
        ),
        threshold_and_scale_ref(nums, -2.0, 2.0, 0.5, 1.5),
    )
    close(transform_scores(x, "rank_based"), rank_based_ref(nums))
    close(transform_scores(x, "origin"), nums)
    g = torch.Generator().manual_seed(seed)
    random_weights = transform_scores(x, "random", generator=g)
    assert bool(((random_weights >= 0.7) & (random_weights <= 1.3)).all())


def test_weights_from_two_contrastive_models() -> None:
    """Chosen: log p_pos - log p_neg; rejected: negated; last token (EOS) and padding 0."""
    g = torch.Generator().manual_seed(0)
    pos = -torch.rand(2, 8, generator=g) * 4
    neg = -torch.rand(2, 8, generator=g) * 4
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, 2:7] = True  # prompt 0..1, response 2..5, EOS at 6, pad 7
    mask[1, 1:8] = True
    for side, sign in (("chosen", 1.0), ("rejected", -1.0)):
        weights = contrastive_token_weights(pos, neg, mask, side=side, transform="rank_based")
        for row in range(2):
            positions = mask[row].nonzero().flatten().tolist()
            body, eos = positions[:-1], positions[-1]
            scores = [round(sign * float(pos[row, t] - neg[row, t]), 2) for t in body]
            expected = rank_based_ref(scores)
            torch.testing.assert_close(
                weights[row, body].double(),
                torch.tensor(expected, dtype=torch.float64),
                rtol=1e-6,
                atol=1e-7,
            )
            assert float(weights[row, eos]) == 0.0
            assert bool((weights[row, ~mask[row]] == 0).all())
        assert bool(((weights[mask] >= 0) & (weights[mask] <= 1.3 + 1e-6)).all())
    # Default transform (binary, top 100 %): every response token but the EOS weighs 1.
    default = contrastive_token_weights(pos, neg, mask, side="chosen")
    assert float(default[mask].sum()) == float(mask.sum() - 2)
    no_eos = contrastive_token_weights(pos, neg, mask, side="chosen", zero_last_token=False)
    assert float(no_eos[mask].sum()) == float(mask.sum())


def test_weights_feed_the_tisdpo_objective() -> None:
    g = torch.Generator().manual_seed(1)
    b, t = 3, 6
    mask = torch.ones(b, t, dtype=torch.bool)
    pos, neg = -torch.rand(b, t, generator=g), -torch.rand(b, t, generator=g)
    chosen_w = contrastive_token_weights(pos, neg, mask, side="chosen", transform="rank_based")
    rejected_w = contrastive_token_weights(pos, neg, mask, side="rejected", transform="rank_based")
    logps = [-torch.rand(b, t, generator=g) for _ in range(4)]
    batch = PairBatch(
        logps[0],
        logps[1],
        mask,
        mask,
        logps[2],
        logps[3],
        chosen_weights=chosen_w,
        rejected_weights=rejected_w,
    )
    out = make_objective("tisdpo")(batch)
    margin = ((logps[0] - logps[2]) * chosen_w).sum(1) - ((logps[1] - logps[3]) * rejected_w).sum(1)
    torch.testing.assert_close(out.logits, 0.1 * margin, rtol=1e-6, atol=1e-8)


def test_bad_inputs_raise() -> None:
    x = torch.zeros(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="side"):
        contrastive_token_weights(x, x, mask, side="winner")
    with pytest.raises(ValueError, match="transform: unknown"):
        contrastive_token_weights(x, x, mask, side="chosen", transform="softmax")
    with pytest.raises(ValueError, match="transform_params"):
        contrastive_token_weights(x, x, mask, side="chosen", transform_params={"top": 5})
    with pytest.raises(ValueError, match="negative_logps"):
        contrastive_token_weights(x, torch.full((2, 3), float("nan")), mask, side="chosen")
    with pytest.raises(ValueError, match="shapes"):
        contrastive_token_weights(x, x[:, :2], mask, side="chosen")
