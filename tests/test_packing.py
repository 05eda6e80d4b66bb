"""Padding-free packing: every sequence of a micro-batch in one row, position ids restarting per
sequence, no attention mask (the model finds the sequences from the position ids). Per-token
log-probs, per-token KL against a live reference, the reference's hidden states, the loss and
every gradient equal the padded layout's (fp32), for each attention path that runs on CPU.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from pipeline import training
from pipeline.config import TrainConfig, build_objective
from tests.conftest import random_llama

DATA = training.PairData(
    pair_ids=["a", "b", "c"],
    prompts=[[1, 2, 3], [4, 5], [7, 8, 9, 10, 11]],
    chosen=[[6, 7, 8, 9], [10, 11, 12], [3]],
    rejected=[[13, 14], [15, 16, 17, 18, 19], [20, 21, 22]],
)


def test_pack_sequences_layout() -> None:
    """One row, no padding: each sequence's tokens in order, positions restarting at 0."""
    batch = training.collate(DATA, [0, 1, 2], 0, pad_id=0, layout="packed")
    lengths = [7, 5, 6, 5, 7, 8]  # chosen rows, then rejected rows
    assert batch.packed_ids is not None and batch.packed_positions is not None
    assert batch.packed_ids.shape == (1, sum(lengths)) and batch.packed_segments is None
    expected = [i for n in lengths for i in range(n)]
    assert batch.packed_positions[0].tolist() == expected
    assert batch.unpack_index is not None and batch.unpack_rows is not None
    # unpacking gives back every real token of the padded layout
    unpacked = batch.packed_ids[batch.unpack_rows, batch.unpack_index]
    real = batch.attention_mask.bool()
    assert torch.equal(unpacked[real], batch.input_ids[real])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize(
    ("objective", "args"),
    [
        ("dpo", {}),
        ("tdpo", {}),
        ("sparsepo", {"mask_source": "activations"}),
        ("sparsepo", {"hidden_size": 16, "mask_dropout": 0.0}),
    ],
    ids=["sequence-logps", "token-kl", "hidden-states", "hidden-states-learned"],
)
def test_packed_layout_equals_padded(objective: str, args: dict[str, Any], attention: str) -> None:
    lm = random_llama(0, attention)
    reference = training.ReferenceModule(random_llama(1, attention), chunk_size=8)
    torch.manual_seed(0)  # the learned mask head's initial weights
    obj = build_objective(TrainConfig(objective=objective, beta=0.5, objective_args=args))
    module = training.PolicyModule(lm, obj, chunk_size=8)
    distribution = obj.needs_reference_distribution
    results = {}
    for layout in ("padded", "packed"):
        batch = training.collate(DATA, [0, 1, 2], 0, pad_id=0, layout=layout)
        assert (batch.packed_ids is not None) == (layout == "packed")
        with torch.no_grad():
            logps = module(batch.as_dict(), mode="logps")
            ref = reference(
                batch.as_dict(),
                want_logps=not distribution,
                want_hidden=distribution,
                hidden_layers=obj.reference_layers,
            )
        module.zero_grad()
        out = module(batch.as_dict(), ref=ref, ref_head=reference.head)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        kept = {k: v for k, v in ref.items() if v is not None}
        results[layout] = (logps, out["loss"].detach(), grads, kept)
    padded, packed = results["padded"], results["packed"]
    mask = training.collate(DATA, [0, 1, 2], 0, pad_id=0).response_mask
    torch.testing.assert_close(packed[0], padded[0], atol=1e-5, rtol=1e-5)
    assert padded[0][mask].abs().sum() > 0  # the log-probs are real, not zeros
    torch.testing.assert_close(packed[1], padded[1], atol=1e-6, rtol=1e-6)
    assert padded[2].keys() == packed[2].keys()
    assert any(bool(g.abs().sum() > 0) for g in padded[2].values())  # a real gradient
    for name, grad in padded[2].items():
        torch.testing.assert_close(packed[2][name], grad, atol=1e-6, rtol=1e-4, msg=name)
    # what the reference hands the policy (log-probs, hidden states) on real tokens
    real = training.collate(DATA, [0, 1, 2], 0, pad_id=0).attention_mask.bool()
    assert padded[3].keys() == packed[3].keys() and padded[3]
    for key, value in padded[3].items():
        torch.testing.assert_close(packed[3][key][real], value[real], atol=1e-5, rtol=1e-5)
