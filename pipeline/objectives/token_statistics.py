"""Per-token log-probs and KL from hidden states, without [batch, seq, vocab] logits.

Only response positions are computed: their hidden states are gathered first ([N, H]), then the LM
head runs on chunks of ``chunk_size`` tokens. With ``recompute`` (the default) each chunk runs under
``torch.utils.checkpoint.checkpoint(use_reentrant=False)``, so its logits are freed after the forward
and recomputed in backward: peak memory is O(chunk_size x vocab), not O(tokens x vocab). Without it
every chunk keeps its logits for backward (O(tokens x vocab) in the model's dtype) and the head runs
once per step instead of twice (on an H200 that gave no measurable speed: docs/training.md). Within a
chunk, a custom autograd function computes the log-probs / KL from the logits, and their gradient
in closed form, on row blocks: a chunk holds at most three [chunk, vocab] float32 buffers (policy
logits, reference log-probs, logit gradient). Values and gradients equal the naive full-logits
computation (float32, to ~1e-6).

Shift convention (causal LM): the hidden state at position t - 1 predicts the token at position t.
``response_token_stats`` takes the model's final hidden states ``[B, T, H]`` and ``labels [B, T]``,
``mask [B, T]`` in *input* positions (``mask[b, t]`` marks response token ``labels[b, t]``) and
returns ``[B, T]`` tensors aligned with the labels (entry ``[b, t]`` is about token ``labels[b, t]``,
0 where the mask is False). Position 0 has no predecessor and can never be a response token. Pass
``shift=False`` when hidden states are already aligned with their targets.

LM head under DeepSpeed ZeRO-3: pass the head as a module (e.g. ``model.lm_head``), never its
weight. Each chunk calls the module, so ZeRO-3's hooks gather the partitioned weight on every call,
forward and backward recompute alike, and route the gradient back to the partition. A caller
holding a raw weight tensor can wrap it with ``linear_head(weight)`` and pass ``gather``: a
zero-argument callable returning a context manager entered around every head call, e.g.
``lambda: deepspeed.zero.GatheredParameters([weight])`` (read-only gather: the gradient of a raw
partitioned weight is then the caller's business; the module route is the supported one).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

LMHead = Callable[[Tensor], Tensor]  # hidden [N, H] -> logits [N, V]
Gather = Callable[[], AbstractContextManager[Any]]

DEFAULT_CHUNK_SIZE = 1024


class TokenStats(NamedTuple):
    """Per-token statistics (float32). Fields not requested are None."""

    logps: Tensor  # log pi_theta(y_t | x, y_<t)
    ref_logps: Tensor | None  # log pi_ref(y_t | x, y_<t)
    kl: Tensor | None  # KL(pi_ref(.|prefix) || pi_theta(.|prefix)) over the full vocabulary
    reverse_kl: Tensor | None  # KL(pi_theta(.|prefix) || pi_ref(.|prefix))


def linear_head(weight: Tensor, bias: Tensor | None = None) -> LMHead:
    """An LM head callable from a raw weight [V, H] (and bias [V])."""

    def head(hidden: Tensor) -> Tensor:
        return F.linear(hidden, weight, bias)

    return head


def _no_gather() -> AbstractContextManager[Any]:
    return contextlib.nullcontext()


# Row blocks of about this many elements bound the temporaries inside a chunk: 16 MiB float32 on
# a CPU (cache-sized), 1 GiB on a GPU, where each block costs a handful of kernel launches and a
# whole chunk usually fits in one block.
_BLOCK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 28}


def _row_blocks(rows: int, vocab: int, device: torch.device) -> list[slice]:
    limit = _BLOCK_ELEMENTS.get(device.type, _BLOCK_ELEMENTS["cpu"])
    step = max(1, min(rows, limit // max(vocab, 1)))
    return [slice(start, start + step) for start in range(0, rows, step)]


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    """float32 logits divided by the temperature (no copy when already float32 and T = 1)."""
    z = logits.float()
    return z if temperature == 1.0 else z / temperature


class _LogitStats(torch.autograd.Function):
    """Per-token log-prob and KL to the reference from one chunk's logits, memory-lean.

    Works on row blocks, so the only [C, V] buffers are the policy logits (input, kept for
    backward), the reference log-probs (normalised in place in the reference logits, which this
    function owns) and, in backward, the gradient w.r.t. the logits, written in closed form:
        d log pi(y)/dz = onehot(y) - pi,  d KL(ref || pi)/dz = pi - ref,
        d KL(pi || ref)/dz = pi * (log pi - log ref - KL(pi || ref)).
    Inputs: logits [C, V] (any float dtype; upcast per block), labels [C], ref_logits [C, V] or
    None. Outputs: logps [C], then with a reference: ref_logps [C], kl [C], reverse_kl [C]
    (kl / reverse_kl zeros when not requested).
    """

    @staticmethod
    def forward(
        ctx: Any,
        logits: Tensor,
        labels: Tensor,
        ref_logits: Tensor | None,
        temperature: float,
        want_kl: bool,
        want_reverse_kl: bool,
    ) -> tuple[Tensor, ...]:
        rows, vocab = logits.shape
        blocks = _row_blocks(rows, vocab, logits.device)
        lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
        for b in blocks:
            # log-sum-exp, not softmax().log(): the latter gives -inf where probabilities underflow.
            lse[b] = torch.logsumexp(_scaled(logits[b], temperature), dim=-1)
        index = labels.unsqueeze(-1)
        logps = _scaled(logits.gather(-1, index).squeeze(-1), temperature) - lse
        ctx.temperature = temperature
        ctx.has_ref = ref_logits is not None
        ctx.want_kl, ctx.want_reverse_kl = want_kl, want_reverse_kl
        if ref_logits is None:
            ctx.save_for_backward(logits, labels, lse)
            return (logps,)

        ref_logps = ref_logits.float()  # owned by this chunk: normalised in place
        if ref_logps.data_ptr() == ref_logits.data_ptr() and ref_logits.requires_grad:
            ref_logps = ref_logps.clone()
        if temperature != 1.0:
            ref_logps.div_(temperature)
        for b in blocks:
            ref_logps[b] -= torch.logsumexp(ref_logps[b], dim=-1, keepdim=True)
        # -inf (masked vocabulary) -> most negative float: exp() is still 0 and 0 * finite = 0,
        # where 0 * inf would give NaN.
        ref_logps.clamp_(min=torch.finfo(torch.float32).min)
        kl = torch.zeros(rows, dtype=torch.float32, device=logits.device)
        reverse_kl = torch.zeros_like(kl)
        for b in blocks:
            block_logps = _scaled(logits[b], temperature) - lse[b].unsqueeze(-1)
            ref_block = ref_logps[b]
            if want_kl:
                kl[b] = (ref_block - block_logps).mul_(ref_block.exp()).sum(dim=-1)
            if want_reverse_kl:
                probs = block_logps.exp()
                terms = (block_logps - ref_block).mul_(probs)
                reverse_kl[b] = terms.masked_fill_(probs == 0, 0.0).sum(dim=-1)
        ref_token_logps = ref_logps.gather(-1, index).squeeze(-1)
        ctx.mark_non_differentiable(ref_token_logps)
        ctx.save_for_backward(logits, labels, lse, ref_logps, reverse_kl)
        return logps, ref_token_logps, kl, reverse_kl

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        logits: Tensor = saved[0]
        labels: Tensor = saved[1]
        lse: Tensor = saved[2]
        temperature: float = ctx.temperature
        grad_logp = grads[0]
        grad_kl = grads[2] if ctx.has_ref and ctx.want_kl else None
        grad_reverse = grads[3] if ctx.has_ref and ctx.want_reverse_kl else None
        # Per row: grad = pi * (g_kl - g_logp) - g_kl * ref + g_logp * onehot(y) (+ reverse part).
        coef = -grad_logp if grad_kl is None else grad_kl - grad_logp
        grad = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        for b in _row_blocks(logits.shape[0], logits.shape[1], logits.device):
            block_logps = _scaled(logits[b], temperature) - lse[b].unsqueeze(-1)
            probs = torch.exp(block_logps, out=grad[b])
            reverse_part = None
            if grad_reverse is not None:
                ref_logps, reverse_kl = saved[3][b], saved[4][b]
                reverse_part = (block_logps - ref_logps).sub_(reverse_kl.unsqueeze(-1))
                reverse_part.mul_(probs).masked_fill_(probs == 0, 0.0)
                reverse_part.mul_(grad_reverse[b].unsqueeze(-1))
            probs.mul_(coef[b].unsqueeze(-1))
            if grad_kl is not None:
                probs.addcmul_(saved[3][b].exp(), grad_kl[b].unsqueeze(-1), value=-1.0)
            if reverse_part is not None:
                probs.add_(reverse_part)
        grad.scatter_add_(-1, labels.unsqueeze(-1), grad_logp.unsqueeze(-1))
        if temperature != 1.0:
            grad.div_(temperature)
        return grad.to(logits.dtype), None, None, None, None, None


def _chunk_stats(
    hidden: Tensor,
    labels: Tensor,
    ref_hidden: Tensor | None,
    *,
    lm_head: LMHead,
    ref_lm_head: LMHead | None,
    temperature: float,
    want_kl: bool,
    want_reverse_kl: bool,
    gather: Gather,
) -> tuple[Tensor, ...]:
    """Statistics of one chunk: (logps, [ref_logps, [kl], [reverse_kl]]), each [C]."""
    with gather():
        logits = lm_head(hidden)
    ref_logits = None
    if ref_hidden is not None and ref_lm_head is not None:
        with torch.no_grad(), gather():
            ref_logits = ref_lm_head(ref_hidden)
    outputs = _LogitStats.apply(logits, labels, ref_logits, temperature, want_kl, want_reverse_kl)
    if ref_logits is None:
        return (outputs[0],)
    logps, ref_logps, kl, reverse_kl = outputs
    chosen = (
        [logps, ref_logps] + ([kl] if want_kl else []) + ([reverse_kl] if want_reverse_kl else [])
    )
    return tuple(chosen)


def token_stats(
    hidden: Tensor,
    labels: Tensor,
    lm_head: LMHead,
    *,
    ref_hidden: Tensor | None = None,
    ref_lm_head: LMHead | None = None,
    kl: bool = True,
    reverse_kl: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
    gather: Gather | None = None,
    recompute: bool = True,
) -> TokenStats:
    """Statistics for N selected tokens: hidden [N, H] predicts labels [N].

    With ``ref_hidden`` [N, H_ref] and ``ref_lm_head`` also returns the reference log-probs and, if
    ``kl``/``reverse_kl``, the per-token KL over the full vocabulary (reference side under no_grad).
    ``temperature`` divides the logits of both models. Results are float32 [N]. ``recompute``:
    recompute each chunk's logits in backward (bounded memory) or keep them (one head pass less).
    """
    if hidden.dim() != 2:
        raise ValueError(f"hidden: expected [N, H], got shape {tuple(hidden.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(
            f"labels: expected shape {tuple(hidden.shape[:1])}, got {tuple(labels.shape)}"
        )
    if (ref_hidden is None) != (ref_lm_head is None):
        raise ValueError("ref_hidden and ref_lm_head: give both or neither")
    if ref_hidden is not None and ref_hidden.shape[:1] != hidden.shape[:1]:
        raise ValueError(
            f"ref_hidden: expected {hidden.shape[0]} rows (as hidden), got {tuple(ref_hidden.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    with_ref = ref_hidden is not None
    want_kl = with_ref and kl
    want_reverse_kl = with_ref and reverse_kl
    labels = labels.long()
    if ref_hidden is not None:
        ref_hidden = ref_hidden.detach()

    def run(h: Tensor, y: Tensor, ref_h: Tensor | None) -> tuple[Tensor, ...]:
        return _chunk_stats(
            h,
            y,
            ref_h,
            lm_head=lm_head,
            ref_lm_head=ref_lm_head,
            temperature=temperature,
            want_kl=want_kl,
            want_reverse_kl=want_reverse_kl,
            gather=gather or _no_gather,
        )

    # Recompute in backward only when a gradient can flow (hidden or the head's parameters).
    recompute = recompute and torch.is_grad_enabled()
    chunks: list[tuple[Tensor, ...]] = []
    for start in range(0, hidden.shape[0], chunk_size):
        end = start + chunk_size
        ref_chunk = ref_hidden[start:end] if ref_hidden is not None else None
        if recompute:
            out = checkpoint(
                run, hidden[start:end], labels[start:end], ref_chunk, use_reentrant=False
            )
        else:
            out = run(hidden[start:end], labels[start:end], ref_chunk)
        chunks.append(out)

    n_outputs = 1 + int(with_ref) + int(want_kl) + int(want_reverse_kl)
    if chunks:
        columns = [torch.cat([c[i] for c in chunks]) for i in range(n_outputs)]
    else:
        # No tokens: empty results, still attached to the graph so backward() works.
        empty = hidden.sum(dim=-1).float()
        columns = [empty for _ in range(n_outputs)]
    logps = columns.pop(0)
    ref_logps = columns.pop(0) if with_ref else None
    kl_values = columns.pop(0) if want_kl else None
    reverse_kl_values = columns.pop(0) if want_reverse_kl else None
    return TokenStats(logps, ref_logps, kl_values, reverse_kl_values)


def response_token_stats(
    hidden: Tensor,
    labels: Tensor,
    mask: Tensor,
    lm_head: LMHead,
    *,
    ref_hidden: Tensor | None = None,
    ref_lm_head: LMHead | None = None,
    kl: bool = True,
    reverse_kl: bool = False,
    shift: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
    gather: Gather | None = None,
    recompute: bool = True,
) -> TokenStats:
    """Per-token statistics on response positions of full sequences, as [B, T] (0 off the mask).

    hidden [B, T, H] (final hidden states of the model), labels [B, T] (token ids, usually the
    input ids), mask [B, T] bool (response tokens, in label positions). With ``shift`` the hidden
    state at t - 1 predicts labels[:, t]. See the module docstring for the ZeRO-3 notes.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden: expected [B, T, H], got shape {tuple(hidden.shape)}")
    if labels.shape != hidden.shape[:2]:
        raise ValueError(
            f"labels: expected shape {tuple(hidden.shape[:2])}, got {tuple(labels.shape)}"
        )
    if mask.shape != labels.shape:
        raise ValueError(f"mask: expected shape {tuple(labels.shape)}, got {tuple(mask.shape)}")
    if ref_hidden is not None and ref_hidden.shape[:2] != hidden.shape[:2]:
        raise ValueError(
            f"ref_hidden: expected [B, T] = {tuple(hidden.shape[:2])}, got {tuple(ref_hidden.shape)}"
        )
    mask = mask.bool()
    if shift and bool(mask[:, 0].any()):
        raise ValueError("mask: position 0 cannot be a response token (nothing predicts it)")
    rows, cols = mask.nonzero(as_tuple=True)
    source_cols = cols - 1 if shift else cols
    stats = token_stats(
        hidden[rows, source_cols],
        labels[rows, cols],
        lm_head,
        ref_hidden=None if ref_hidden is None else ref_hidden[rows, source_cols],
        ref_lm_head=ref_lm_head,
        kl=kl,
        reverse_kl=reverse_kl,
        chunk_size=chunk_size,
        temperature=temperature,
        gather=gather,
        recompute=recompute,
    )

    def scatter(values: Tensor | None) -> Tensor | None:
        if values is None:
            return None
        out = values.new_zeros(mask.shape)
        return out.index_put((rows, cols), values)

    logps = scatter(stats.logps)
    assert logps is not None
    return TokenStats(logps, scatter(stats.ref_logps), scatter(stats.kl), scatter(stats.reverse_kl))


def sequence_logps(token_logps: Tensor, mask: Tensor, average: bool = False) -> Tensor:
    """Sum (or mean, if ``average``) of per-token values over the mask: [B, T] -> [B]."""
    mask = mask.bool()
    total = torch.where(
        mask, token_logps, torch.zeros((), dtype=token_logps.dtype, device=token_logps.device)
    ).sum(dim=1)
    if average:
        return total / mask.sum(dim=1).clamp(min=1).to(total.dtype)
    return total
