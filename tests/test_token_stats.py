"""Chunked token statistics equal the naive full-logits computation (values and gradients)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from pipeline.objectives import linear_head, response_token_stats, sequence_logps, token_stats
from pipeline.objectives import token_statistics as token_stats_module


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny tensors: intra-op threads only add contention on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


H, V = 16, 37


def _naive(
    hidden: Tensor,
    labels: Tensor,
    mask: Tensor,
    head: nn.Module,
    ref_hidden: Tensor,
    ref_head: nn.Module,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Full [B, T, V] logits, then shift, as a plain trainer would (log_softmax everywhere)."""
    logps_all = torch.log_softmax(head(hidden).float()[:, :-1] / temperature, dim=-1)
    with torch.no_grad():
        ref_logps_all = torch.log_softmax(ref_head(ref_hidden).float()[:, :-1] / temperature, -1)
    targets = labels[:, 1:].unsqueeze(-1)
    logps = logps_all.gather(-1, targets).squeeze(-1)
    ref_logps = ref_logps_all.gather(-1, targets).squeeze(-1)
    kl = (ref_logps_all.exp() * (ref_logps_all - logps_all)).sum(-1)
    reverse_kl = (logps_all.exp() * (logps_all - ref_logps_all)).sum(-1)
    m = mask[:, 1:].float()
    pad = torch.zeros(hidden.shape[0], 1)
    return tuple(torch.cat([pad, x * m], dim=1) for x in (logps, ref_logps, kl, reverse_kl))  # type: ignore[return-value]


def _inputs(seed: int, batch: int = 3, length: int = 11) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, H, generator=g) * 2
    ref_hidden = hidden + 0.3 * torch.randn(batch, length, H, generator=g)
    labels = torch.randint(0, V, (batch, length), generator=g)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):  # prompt of 2..4 tokens, response, then padding
        start = 2 + b % 3
        mask[b, start : length - b] = True
    return hidden, ref_hidden, labels, mask


def _heads(seed: int) -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(seed)
    head, ref_head = nn.Linear(H, V, bias=False), nn.Linear(H, V, bias=False)
    ref_head.requires_grad_(False)
    return head, ref_head


@pytest.mark.parametrize(
    ("chunk_size", "block_rows", "recompute"),
    [(1, 1, True), (4, 1, True), (7, 3, True), (1024, 2, True), (1024, 0, True),
     (4, 1, False), (7, 3, False), (1024, 0, False)],
)  # fmt: skip
def test_values_and_gradients_equal_naive(
    chunk_size: int, block_rows: int, recompute: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if block_rows:  # inside a chunk, rows are processed in blocks: exercise several
        monkeypatch.setitem(token_stats_module._BLOCK_ELEMENTS, "cpu", block_rows * V)
    hidden, ref_hidden, labels, mask = _inputs(0)
    head, ref_head = _heads(0)
    weights = torch.randn(4, generator=torch.Generator().manual_seed(1))

    def loss_of(stats: tuple[Tensor, ...]) -> Tensor:
        return sum(w * s.sum() for w, s in zip(weights, stats, strict=True))  # type: ignore[return-value]

    h1 = hidden.clone().requires_grad_()
    naive = _naive(h1, labels, mask, head, ref_hidden, ref_head)
    loss_of(naive).backward()
    grad_h_naive, grad_w_naive = h1.grad, head.weight.grad.clone()  # type: ignore[union-attr]
    head.weight.grad = None

    h2 = hidden.clone().requires_grad_()
    stats = response_token_stats(
        h2,
        labels,
        mask,
        head,
        ref_hidden=ref_hidden,
        ref_lm_head=ref_head,
        reverse_kl=True,
        chunk_size=chunk_size,
        recompute=recompute,
    )
    assert stats.ref_logps is not None and stats.kl is not None and stats.reverse_kl is not None
    chunked = (stats.logps, stats.ref_logps, stats.kl, stats.reverse_kl)
    for a, b in zip(chunked, naive, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert bool((a[~mask] == 0).all())  # nothing outside the response
    loss_of(chunked).backward()
    torch.testing.assert_close(h2.grad, grad_h_naive, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.weight.grad, grad_w_naive, rtol=1e-5, atol=1e-5)


def test_temperature_and_bias() -> None:
    hidden, ref_hidden, labels, mask = _inputs(2)
    torch.manual_seed(2)
    head, ref_head = nn.Linear(H, V), nn.Linear(H, V)
    naive = _naive(hidden, labels, mask, head, ref_hidden, ref_head, temperature=0.7)
    stats = response_token_stats(
        hidden,
        labels,
        mask,
        head,
        ref_hidden=ref_hidden,
        ref_lm_head=ref_head,
        chunk_size=5,
        temperature=0.7,
    )
    torch.testing.assert_close(stats.logps, naive[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.kl, naive[2], rtol=1e-5, atol=1e-5)


def test_flat_api_and_unshifted_alignment() -> None:
    hidden, _, labels, mask = _inputs(3)
    head, _ = _heads(3)
    shifted = response_token_stats(hidden, labels, mask, head, chunk_size=3)
    # Pre-aligned hidden states (hidden[t] predicts labels[t]) give the same numbers.
    aligned = torch.cat([torch.zeros_like(hidden[:, :1]), hidden[:, :-1]], dim=1)
    unshifted = response_token_stats(aligned, labels, mask, head, shift=False, chunk_size=3)
    torch.testing.assert_close(shifted.logps, unshifted.logps)
    rows, cols = mask.nonzero(as_tuple=True)
    flat = token_stats(hidden[rows, cols - 1], labels[rows, cols], head, chunk_size=4)
    torch.testing.assert_close(flat.logps, shifted.logps[rows, cols])
    assert flat.ref_logps is None and flat.kl is None
    naive_seq = sequence_logps(shifted.logps, mask)
    assert naive_seq.shape == (hidden.shape[0],)
    torch.testing.assert_close(
        sequence_logps(shifted.logps, mask, average=True), naive_seq / mask.sum(1)
    )


def test_no_nan_where_softmax_underflows() -> None:
    """softmax().log() gives -inf and NaN KL for extreme logits; log_softmax stays finite."""
    hidden = torch.zeros(1, 3, H)
    hidden[0, :, 0] = 1.0
    weight = torch.zeros(V, H)
    weight[:, 0] = torch.linspace(-2000, 2000, V)
    labels = torch.tensor([[0, 0, 1]])
    mask = torch.tensor([[False, True, True]])
    head = linear_head(weight)
    ref_head = linear_head(weight.flip(0))
    stats = response_token_stats(
        hidden, labels, mask, head, ref_hidden=hidden, ref_lm_head=ref_head
    )
    assert stats.kl is not None and stats.ref_logps is not None
    for values in (stats.logps, stats.ref_logps, stats.kl):
        assert bool(torch.isfinite(values).all())
    assert float(stats.logps[0, 1]) < -1000  # the true value, not -inf
    naive = torch.log(torch.softmax(head(hidden[:, :1]), -1))[0, 0, 0]
    assert not bool(torch.isfinite(naive))  # the peers' formula really breaks here


class ShardedHead(nn.Module):
    """A head with no `.weight`: rows live in shards gathered inside forward, like ZeRO-3."""

    def __init__(self, weight: Tensor, shards: int = 3) -> None:
        super().__init__()
        self.shards = nn.ParameterList(nn.Parameter(w.clone()) for w in weight.chunk(shards))
        self.calls = 0

    def forward(self, hidden: Tensor) -> Tensor:
        self.calls += 1
        full = torch.cat(list(self.shards))  # the "all-gather"
        return hidden @ full.t()


def test_partitioned_head_is_called_not_read_and_recomputed_in_backward() -> None:
    hidden, _, labels, mask = _inputs(4)
    dense, _ = _heads(4)
    sharded = ShardedHead(dense.weight.detach())
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    expected = response_token_stats(h1, labels, mask, dense, chunk_size=4).logps
    expected.sum().backward()
    got = response_token_stats(h2, labels, mask, sharded, chunk_size=4).logps
    n_chunks = -(-int(mask.sum()) // 4)
    assert sharded.calls == n_chunks  # forward: one gather per chunk
    got.sum().backward()
    assert sharded.calls == 2 * n_chunks  # backward recomputed each chunk through the module
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(h2.grad, h1.grad)
    grad = torch.cat([p.grad for p in sharded.shards])  # type: ignore[misc]
    torch.testing.assert_close(grad, dense.weight.grad)
    # recompute=False keeps each chunk's logits: the head runs once per chunk, same gradients
    kept = ShardedHead(dense.weight.detach())
    h3 = hidden.clone().requires_grad_()
    logps = response_token_stats(h3, labels, mask, kept, chunk_size=4, recompute=False).logps
    logps.sum().backward()
    assert kept.calls == n_chunks
    torch.testing.assert_close(logps, expected)
    torch.testing.assert_close(h3.grad, h1.grad)
    torch.testing.assert_close(torch.cat([p.grad for p in kept.shards]), dense.weight.grad)  # type: ignore[misc]


def test_gather_hook_wraps_every_head_call() -> None:
    hidden, ref_hidden, labels, mask = _inputs(5)
    head, ref_head = _heads(5)
    entered: list[int] = []

    @contextlib.contextmanager
    def gather() -> Iterator[None]:
        entered.append(1)
        yield

    h = hidden.clone().requires_grad_()
    stats = response_token_stats(
        h,
        labels,
        mask,
        linear_head(head.weight),
        ref_hidden=ref_hidden,
        ref_lm_head=linear_head(ref_head.weight),
        chunk_size=8,
        gather=gather,
    )
    n_chunks = -(-int(mask.sum()) // 8)
    assert len(entered) == 2 * n_chunks  # policy and reference head per chunk
    (stats.logps.sum() + stats.kl.sum()).backward()  # type: ignore[union-attr]
    assert len(entered) == 4 * n_chunks  # both recomputed in backward


def test_no_grad_mode_and_bf16_hidden() -> None:
    hidden, _, labels, mask = _inputs(6)
    head, _ = _heads(6)
    with torch.no_grad():
        stats = response_token_stats(hidden, labels, mask, head, chunk_size=5)
    assert not stats.logps.requires_grad
    head_bf16 = nn.Linear(H, V, bias=False).to(torch.bfloat16)
    head_bf16.weight.data.copy_(head.weight.data)
    bf16 = response_token_stats(hidden.to(torch.bfloat16), labels, mask, head_bf16).logps
    assert bf16.dtype == torch.float32  # logits are upcast before log_softmax
    torch.testing.assert_close(bf16, stats.logps, rtol=0.05, atol=0.1)


def test_bad_inputs() -> None:
    hidden, ref_hidden, labels, mask = _inputs(7)
    head, ref_head = _heads(7)
    bad_mask = mask.clone()
    bad_mask[0, 0] = True
    with pytest.raises(ValueError, match="mask: position 0"):
        response_token_stats(hidden, labels, bad_mask, head)
    with pytest.raises(ValueError, match="labels"):
        response_token_stats(hidden, labels[:, :-1], mask, head)
    with pytest.raises(ValueError, match="ref_hidden and ref_lm_head"):
        response_token_stats(hidden, labels, mask, head, ref_hidden=ref_hidden)
    with pytest.raises(ValueError, match="chunk_size"):
        response_token_stats(hidden, labels, mask, head, chunk_size=0)
    with pytest.raises(ValueError, match="hidden"):
        token_stats(hidden, labels, head)
    with pytest.raises(ValueError, match="temperature"):
        token_stats(hidden[0], labels[0], head, temperature=0.0)


def test_no_response_tokens_gives_zeros_and_backward_works() -> None:
    hidden, _, labels, mask = _inputs(8)
    head, _ = _heads(8)
    h = hidden.clone().requires_grad_()
    stats = response_token_stats(h, labels, torch.zeros_like(mask), head)
    assert bool((stats.logps == 0).all())
    stats.logps.sum().backward()
    assert h.grad is not None and bool((h.grad == 0).all())


def test_masked_vocabulary_gives_finite_kl() -> None:
    """-inf logits (a masked vocabulary) in the reference: those tokens contribute 0 to the KL."""
    hidden, ref_hidden, labels, mask = _inputs(9)
    labels = labels % (V - 5)  # never a masked token
    head, ref_head = _heads(9)

    def masked_ref(h: Tensor) -> Tensor:
        return ref_head(h).masked_fill(torch.arange(V) >= V - 5, float("-inf"))

    h = hidden.clone().requires_grad_()
    stats = response_token_stats(
        h, labels, mask, head, ref_hidden=ref_hidden, ref_lm_head=masked_ref
    )
    assert stats.kl is not None and bool(torch.isfinite(stats.kl).all())
    logps_all = torch.log_softmax(head(hidden)[:, :-1], -1)
    ref_all = torch.log_softmax(masked_ref(ref_hidden)[:, :-1], -1)
    terms = torch.where(ref_all.exp() > 0, ref_all.exp() * (ref_all - logps_all), 0.0)
    expected = torch.cat([torch.zeros(3, 1), terms.sum(-1)], 1) * mask
    torch.testing.assert_close(stats.kl, expected.detach(), rtol=1e-5, atol=1e-5)
    stats.kl.sum().backward()
    assert h.grad is not None and bool(torch.isfinite(h.grad).all())
