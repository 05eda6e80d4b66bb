"""Per-token log-probs and KL from hidden states, without [batch, seq, vocab] logits.

Only response positions are computed: their hidden states are gathered first ([N, H]), then the LM
head runs on chunks of ``chunk_size`` tokens. Each chunk runs under
``torch.utils.checkpoint.checkpoint(use_reentrant=False)``, so its logits are freed after the forward
and recomputed in backward: peak memory is O(chunk_size x vocab), not O(tokens x vocab). Values and
gradients equal the naive full-logits computation (same operations, in float32).

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
    """Statistics of one chunk; everything [C, V] is local and freed on return."""
    with gather():
        logits = lm_head(hidden)
    # log_softmax, not softmax().log(): the latter gives -inf/NaN where probabilities underflow.
    logps_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    index = labels.unsqueeze(-1)
    outputs: list[Tensor] = [logps_all.gather(-1, index).squeeze(-1)]
    if ref_hidden is not None and ref_lm_head is not None:
        with torch.no_grad():
            with gather():
                ref_logits = ref_lm_head(ref_hidden)
            ref_logps_all = torch.log_softmax(ref_logits.float() / temperature, dim=-1)
            ref_probs = ref_logps_all.exp()
        outputs.append(ref_logps_all.gather(-1, index).squeeze(-1))
        if want_kl:
            # Terms with zero reference probability contribute 0 (avoids 0 * -inf = NaN).
            terms = torch.where(ref_probs > 0, ref_probs * (ref_logps_all - logps_all), 0.0)
            outputs.append(terms.sum(dim=-1))
        if want_reverse_kl:
            outputs.append((logps_all.exp() * (logps_all - ref_logps_all)).sum(dim=-1))
    return tuple(outputs)


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
) -> TokenStats:
    """Statistics for N selected tokens: hidden [N, H] predicts labels [N].

    With ``ref_hidden`` [N, H_ref] and ``ref_lm_head`` also returns the reference log-probs and, if
    ``kl``/``reverse_kl``, the per-token KL over the full vocabulary (reference side under no_grad).
    ``temperature`` divides the logits of both models. Results are float32 [N].
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
    recompute = torch.is_grad_enabled()
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
