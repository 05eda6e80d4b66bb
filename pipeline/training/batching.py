"""The order of training: which pairs form each optimizer step, and how they become tensors.

``epoch_batches`` gives a deterministic order from (seed, epoch): global batches sorted by length
inside shuffled windows. ``split_global_batch`` cuts a global batch into ``accumulation x world``
micro-batches of neighbouring lengths. The last, uneven batch of an epoch is kept: its pairs are
spread over the ranks, and a rank left with nothing runs one filler pair with weight 0 (ZeRO-3
needs every rank in every forward). ``collate`` pads one micro-batch (chosen rows, then rejected
rows); ``layout`` adds the shared-prompt layout (``pack_pairs``) or the padding-free one
(``pack_sequences``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.records import SIDES
from pipeline.training.pairs import PairData


def epoch_batches(
    lengths: list[int], global_batch: int, seed: int, epoch: int, bucket_window: int = 16
) -> list[list[int]]:
    """Global batches of pair indices for one epoch; the last one may be short (never dropped).

    Shuffle, sort by length inside windows of ``bucket_window`` global batches (neighbours in a
    batch have similar lengths: less padding), cut into global batches, shuffle their order.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)).tolist()
    window = global_batch * bucket_window
    if bucket_window > 1:
        order = [
            i
            for start in range(0, len(order), window)
            for i in sorted(order[start : start + window], key=lambda j: (-lengths[j], j))
        ]
    batches = [order[i : i + global_batch] for i in range(0, len(order), global_batch)]
    perm = rng.permutation(len(batches)).tolist()
    return [batches[i] for i in perm]


def split_global_batch(
    batch: list[int], lengths: list[int], world_size: int, accumulation: int, rank: int
) -> list[list[int]]:
    """This rank's ``accumulation`` micro-batches of one global batch (some may be empty).

    The pairs, sorted by length, are cut into ``accumulation x world`` contiguous chunks whose
    sizes differ by at most one; chunk k goes to micro-step k // world on rank k % world.
    """
    ordered = sorted(batch, key=lambda j: (-lengths[j], j))
    chunks = accumulation * world_size
    base, extra = divmod(len(ordered), chunks)
    out: list[list[int]] = []
    start = 0
    for k in range(chunks):
        size = base + (1 if k < extra else 0)
        if k % world_size == rank:
            out.append(ordered[start : start + size])
        start += size
    return out


@dataclass
class MicroBatch:
    """One micro-batch: B pairs as 2B sequences, chosen rows first then rejected rows."""

    input_ids: Tensor  # [2B, T] prompt + response, right-padded
    attention_mask: Tensor  # [2B, T]
    response_mask: Tensor  # [2B, T] bool: response tokens, in label positions
    row_weight: Tensor  # [B] 1 for a real pair, 0 for a filler
    pair_ids: list[str]
    num_real: int
    num_tokens: int  # non-padding tokens of the real pairs (both sequences)
    # [2B, T] precomputed reference log-probs aligned with labels, both sides stacked: hence the
    # generic name (a key of objectives.batch.SIDE_FIELDS); PolicyModule splits it into
    # ref_chosen_logps / ref_rejected_logps, PairData's and PairBatch's names.
    ref_logps: Tensor | None = None
    weights: Tensor | None = None  # [2B, T] token weights
    free_ids: Tensor | None = None  # [2B, Tr] responses alone (prompt-free scoring)
    free_attention_mask: Tensor | None = None
    prompt_lengths: Tensor | None = None  # [2B]
    # Shared-prompt layout (train.share_prompt): one row per pair, prompt then chosen then
    # rejected, each response attending to the prompt and itself only (see ``pack_pairs``).
    packed_ids: Tensor | None = None  # [B, L]
    packed_positions: Tensor | None = None  # [B, L] position ids (both responses start at P)
    packed_segments: Tensor | None = None  # [B, L] 0 padding, 1 prompt, 2 chosen, 3 rejected
    unpack_index: Tensor | None = None  # [2B, T] where each position of input_ids sits in its row
    # Padding-free layout (``pack_sequences``): every sequence in one row, position ids restarting
    # per sequence, no segments (the model finds the sequences from the position ids).
    unpack_rows: Tensor | None = None  # [2B, 1] the packed row of each sequence (default r % B)

    @property
    def num_pairs(self) -> int:
        return int(self.row_weight.shape[0])

    def to(self, device: torch.device) -> MicroBatch:
        """The batch on ``device``. To a GPU through pinned memory, without waiting: a copy
        from pageable memory waits for the device's queue to drain, once per field."""
        pinned = torch.device(device).type == "cuda"

        def move(v: Tensor) -> Tensor:
            if pinned and v.device.type == "cpu":
                return v.pin_memory().to(device, non_blocking=True)
            return v.to(device)

        moved = {k: (move(v) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        return MicroBatch(**moved)  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, Any]:
        """The fields as a dict: what engines take, so ZeRO-3's hooks can see the tensors."""
        return dict(self.__dict__)


def collate(
    data: PairData,
    indices: list[int],
    filler: int,
    pad_id: int,
    *,
    ref_logps: bool = False,
    weights: bool = False,
    prompt_free: bool = False,
    share_prompt: bool = False,
    layout: str | None = None,
) -> MicroBatch:
    """Pad one micro-batch. An empty ``indices`` gives one filler pair (weight 0).

    ``layout`` (one of ``LAYOUTS``; default: "shared_prompt" if ``share_prompt`` else
    "padded") adds the model-side layout the decoder runs on; the padded fields stay the
    layout every statistic is read in.
    """
    real = len(indices)
    rows = indices if indices else [filler]
    seqs: list[list[int]] = []
    prompt_lens: list[int] = []
    responses: list[list[int]] = []
    for side in SIDES:
        for j in rows:
            response = getattr(data, side)[j]
            seqs.append(data.prompts[j] + response)
            prompt_lens.append(len(data.prompts[j]))
            responses.append(response)
    n, width = len(seqs), max(len(s) for s in seqs)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    response_mask = torch.zeros((n, width), dtype=torch.bool)
    for r, (s, p) in enumerate(zip(seqs, prompt_lens, strict=True)):
        input_ids[r, : len(s)] = torch.tensor(s)
        attention[r, : len(s)] = 1
        response_mask[r, p : len(s)] = True

    def per_token(chosen_values: list[list[float]], rejected_values: list[list[float]]) -> Tensor:
        out = torch.zeros((n, width), dtype=torch.float32)
        values = [chosen_values[j] for j in rows] + [rejected_values[j] for j in rows]
        for r, (v, p) in enumerate(zip(values, prompt_lens, strict=True)):
            out[r, p : p + len(v)] = torch.tensor(v, dtype=torch.float32)
        return out

    batch = MicroBatch(
        input_ids=input_ids,
        attention_mask=attention,
        response_mask=response_mask,
        row_weight=torch.tensor([1.0 if indices else 0.0] * len(rows)),
        pair_ids=[data.pair_ids[j] for j in indices],
        num_real=real,
        num_tokens=int(attention.sum()) if indices else 0,
    )
    if ref_logps:
        assert data.ref_chosen_logps is not None and data.ref_rejected_logps is not None
        batch.ref_logps = per_token(data.ref_chosen_logps, data.ref_rejected_logps)
    if weights:
        assert data.chosen_weights is not None and data.rejected_weights is not None
        batch.weights = per_token(data.chosen_weights, data.rejected_weights)
    if prompt_free:
        free_width = max(len(r) for r in responses)
        free_ids = torch.full((n, free_width), pad_id, dtype=torch.long)
        free_attention = torch.zeros((n, free_width), dtype=torch.long)
        for r, resp in enumerate(responses):
            free_ids[r, : len(resp)] = torch.tensor(resp)
            free_attention[r, : len(resp)] = 1
        batch.free_ids, batch.free_attention_mask = free_ids, free_attention
        batch.prompt_lengths = torch.tensor(prompt_lens)
    layout = layout or ("shared_prompt" if share_prompt else "padded")
    if layout == "shared_prompt":
        pack_pairs(batch, [data.prompts[j] for j in rows], responses, pad_id)
    elif layout == "packed":
        pack_sequences(batch, seqs)
    return batch


LAYOUTS = ("padded", "shared_prompt", "packed")


def pack_sequences(batch: MicroBatch, seqs: list[list[int]]) -> None:
    """Add the padding-free layout to ``batch``: all sequences in one row, no padding.

    Position ids restart at 0 for every sequence (the Hugging Face flattening convention: with no
    attention mask the model builds a per-sequence causal mask from them, and flash-attention-2
    runs its variable-length kernel), so each sequence sees only itself: the padded layout's
    numbers without computing its padding.
    """
    starts = np.cumsum([0] + [len(s) for s in seqs[:-1]]).tolist()
    batch.packed_ids = torch.tensor([[t for s in seqs for t in s]], dtype=torch.long)
    batch.packed_positions = torch.tensor([[i for s in seqs for i in range(len(s))]])
    index = torch.zeros(batch.input_ids.shape, dtype=torch.long)
    for r, (s, start) in enumerate(zip(seqs, starts, strict=True)):
        index[r, : len(s)] = torch.arange(start, start + len(s))
    batch.unpack_index = index
    batch.unpack_rows = torch.zeros((len(seqs), 1), dtype=torch.long)


PROMPT, CHOSEN, REJECTED = 1, 2, 3  # segment ids of the shared-prompt layout (0: padding)
# Mean |log-prob difference| per response token allowed between the shared-prompt and the
# two-sequence forward (a broken mask gives ~1). The trainer compares in float32, where valid
# data agrees to ~1e-6; bf16 rounds differently for different shapes (0.05 seen on valid data).
SHARED_PROMPT_TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2}


def pack_pairs(
    batch: MicroBatch, prompts: list[list[int]], responses: list[list[int]], pad_id: int
) -> None:
    """Add the shared-prompt layout to ``batch``: each pair's prompt once, then both responses.

    Row b is prompt_b + chosen_b + rejected_b; both responses take positions from P_b on, and
    the attention mask (``shared_prompt_mask``) lets each see the prompt and itself, never the
    other: the same numbers as two separate sequences, with the prompt computed once.
    ``unpack_index`` maps every position of the usual [2B, T] layout to its place in the row.
    """
    b = len(prompts)
    rows = []
    for j, prompt in enumerate(prompts):
        chosen, rejected = responses[j], responses[b + j]
        rows.append(
            (
                prompt + chosen + rejected,
                list(range(len(prompt) + len(chosen)))
                + [len(prompt) + i for i in range(len(rejected))],
                [PROMPT] * len(prompt) + [CHOSEN] * len(chosen) + [REJECTED] * len(rejected),
            )
        )
    width = max(len(ids) for ids, _, _ in rows)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    positions = torch.zeros((b, width), dtype=torch.long)
    segments = torch.zeros((b, width), dtype=torch.long)
    for j, (row_ids, row_pos, row_seg) in enumerate(rows):
        ids[j, : len(row_ids)] = torch.tensor(row_ids)
        positions[j, : len(row_pos)] = torch.tensor(row_pos)
        segments[j, : len(row_seg)] = torch.tensor(row_seg)
    index = torch.zeros(batch.input_ids.shape, dtype=torch.long)
    for r in range(2 * b):
        j, p = r % b, len(prompts[r % b])
        n = len(responses[r])
        index[r, :p] = torch.arange(p)
        # the rejected response sits after the chosen one in the row
        start = p if r < b else p + len(responses[j])
        index[r, p : p + n] = torch.arange(start, start + n)
    batch.packed_ids, batch.packed_positions = ids, positions
    batch.packed_segments, batch.unpack_index = segments, index


def shared_prompt_mask(segments: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive 4D mask [B, 1, L, L]: causal, and a response sees the prompt and itself only."""
    q, k = segments[:, :, None], segments[:, None, :]
    width = segments.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    allowed = causal & (k != 0) & ((k == PROMPT) | (k == q))
    allowed[:, :, 0] = True  # padding rows see the first token: no row is empty (no NaN)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
