"""Property tests: random shapes, masks and values give a finite loss whose gradients match a naive
re-implementation; chunked token statistics match full logits for any chunk size."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from pipeline.objectives import PairBatch, make_objective, response_token_stats

SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@st.composite
def pair_inputs(draw: st.DrawFn) -> dict[str, Tensor]:
    batch = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0, 1e3]))
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for side in ("chosen", "rejected"):
        length = draw(st.integers(1, 12))
        mask = torch.rand(batch, length, generator=g) < draw(st.floats(0.2, 1.0))
        mask[torch.arange(batch), torch.randint(0, length, (batch,), generator=g)] = True
        out[f"{side}_mask"] = mask
        for name, low, high in (
            (f"{side}_logps", -scale, 0.0),
            (f"ref_{side}_logps", -scale, 0.0),
            (f"{side}_kl", 0.0, scale),
            (f"{side}_weights", 0.0, 1.5),
        ):
            values = low + (high - low) * torch.rand(
                batch, length, generator=g, dtype=torch.float64
            )
            out[name] = torch.where(mask, values, float("nan"))  # padding must never be read
    return out


def naive_loss(t: dict[str, Tensor], name: str, beta: float) -> Tensor:
    """Each method's formula with masked sums (padding zeroed first)."""
    s = {
        k: torch.nan_to_num(v) * (t[f"{'chosen' if 'chosen' in k else 'rejected'}_mask"])
        for k, v in t.items()
        if v.dtype != torch.bool
    }
    mc, mr = t["chosen_mask"], t["rejected_mask"]
    lc, lr = s["chosen_logps"].sum(-1), s["rejected_logps"].sum(-1)
    rc, rr = s["ref_chosen_logps"].sum(-1), s["ref_rejected_logps"].sum(-1)
    if name == "dpo":
        logits = (lc - rc) - (lr - rr)
    elif name == "tdpo":  # variant 2, alpha 0.5
        logits = (
            (lc - rc)
            - (lr - rr)
            - 0.5 * (s["rejected_kl"].sum(-1) - s["chosen_kl"].sum(-1).detach())
        )
    elif name == "simpo":
        logits = lc / mc.sum(-1) - lr / mr.sum(-1) - 0.25
    elif name == "tisdpo":
        logits = ((s["chosen_logps"] - s["ref_chosen_logps"]) * s["chosen_weights"]).sum(-1) - (
            (s["rejected_logps"] - s["ref_rejected_logps"]) * s["rejected_weights"]
        ).sum(-1)
    else:
        raise AssertionError(name)
    return -F.logsigmoid(beta * logits).mean()


HPARAMS = {"dpo": {}, "tdpo": {"variant": 2}, "simpo": {}, "tisdpo": {}}


@SETTINGS
@given(
    inputs=pair_inputs(),
    name=st.sampled_from(sorted(HPARAMS)),
    beta=st.sampled_from([0.01, 0.1, 2.0]),
)
def test_loss_finite_and_gradients_match_naive(
    inputs: dict[str, Tensor], name: str, beta: float
) -> None:
    leaves = {
        k: (v if v.dtype == torch.bool else v.float().requires_grad_()) for k, v in inputs.items()
    }
    out = make_objective(name, beta=beta, **HPARAMS[name])(PairBatch(**leaves))
    assert bool(torch.isfinite(out.loss)) and bool(torch.isfinite(out.losses).all())
    out.loss.backward()
    ref = {
        k: (v if v.dtype == torch.bool else v.float().double().requires_grad_())
        for k, v in inputs.items()
    }
    expected = naive_loss(ref, name, beta)
    torch.testing.assert_close(out.loss.double(), expected.detach(), rtol=1e-5, atol=1e-7)
    expected.backward()
    for key in ("chosen_logps", "rejected_logps", "chosen_kl", "rejected_kl"):
        got, want = leaves[key].grad, ref[key].grad
        if got is None and want is None:
            continue
        got = torch.zeros_like(leaves[key]) if got is None else got
        want = torch.zeros_like(ref[key]) if want is None else torch.nan_to_num(want)
        assert bool(torch.isfinite(got).all())
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-9)


@SETTINGS
@given(
    batch=st.integers(1, 3),
    length=st.integers(2, 10),
    chunk_size=st.integers(1, 9),
    vocab=st.integers(2, 40),
    seed=st.integers(0, 2**31 - 1),
    logit_scale=st.sampled_from([0.1, 1.0, 50.0]),
)
def test_chunked_statistics_match_full_logits(
    batch: int, length: int, chunk_size: int, vocab: int, seed: int, logit_scale: float
) -> None:
    g = torch.Generator().manual_seed(seed)
    hidden_size = 6
    hidden = torch.randn(batch, length, hidden_size, generator=g).requires_grad_()
    ref_hidden = torch.randn(batch, length, hidden_size, generator=g)
    weight = (torch.randn(vocab, hidden_size, generator=g) * logit_scale).requires_grad_()
    ref_weight = torch.randn(vocab, hidden_size, generator=g) * logit_scale
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.rand(batch, length, generator=g) < 0.7
    mask[:, 0] = False
    mask[0, -1] = True

    stats = response_token_stats(
        hidden,
        labels,
        mask,
        lambda h: h @ weight.t(),
        ref_hidden=ref_hidden,
        ref_lm_head=lambda h: h @ ref_weight.t(),
        chunk_size=chunk_size,
    )
    assert stats.kl is not None
    (stats.logps.sum() + 0.5 * stats.kl.sum()).backward()
    got = (stats.logps.detach(), stats.kl.detach(), hidden.grad, weight.grad)
    hidden.grad, weight.grad = None, None

    logps_all = torch.log_softmax(hidden @ weight.t(), -1)[:, :-1]
    ref_all = torch.log_softmax(ref_hidden @ ref_weight.t(), -1)[:, :-1]
    logps = logps_all.gather(-1, labels[:, 1:, None]).squeeze(-1) * mask[:, 1:]
    kl = (ref_all.exp() * (ref_all - logps_all)).sum(-1) * mask[:, 1:]
    (logps.sum() + 0.5 * kl.sum()).backward()
    pad = torch.zeros(batch, 1)
    expected = (
        torch.cat([pad, logps.detach()], 1),
        torch.cat([pad, kl.detach()], 1),
        hidden.grad,
        weight.grad,
    )
    for a, b in zip(got, expected, strict=True):
        assert a is not None and b is not None and bool(torch.isfinite(a).all())
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4 * max(1.0, logit_scale))
