"""MI-DPO training on DeepSpeed: data, engines, the step loop, checkpoints, export.

Read top to bottom:

1. **Data** (``load_pairs``): the score stage's pairs, truncated to the model's limits (keep the
   prompt's end and the response's start, and count), checked row by row.
2. **Order** (``epoch_batches``, ``split_global_batch``): a deterministic order from (seed, epoch);
   global batches sorted by length inside shuffled windows; each global batch is cut into
   ``accumulation x world`` micro-batches of neighbouring lengths. The last, uneven batch of an
   epoch is kept: its pairs are spread over the ranks, and a rank left with nothing runs one
   filler pair with weight 0 (ZeRO-3 needs every rank in every forward). Every loss is a mean
   over the real pairs of the optimizer step, so batch 1 x accumulation 4 equals 4 x 1.
3. **DeepSpeed config** (``deepspeed_config``): "auto" values filled from the run config as the
   Hugging Face integration does; an explicit value that contradicts the run config is an error.
4. **Models** (``PolicyModule``, ``ReferenceModule``, ``PromptFreeModule``): the engines' modules.
   Chosen and rejected go through the model in one forward: by default each pair's prompt once,
   followed by both responses (``pack_pairs``: a 4D mask keeps the responses apart), unpacked to
   the usual [2B, T] layout (``decoder_outputs``); per-token log-probs and KL come
   from the objectives library's chunked statistics with the LM head *module* (ZeRO-3 gathers its
   weight). The objective (with any learnable prior parameters) lives inside the policy module.
5. **Trainer**: the policy engine (optimizer: model group + prior group), the frozen reference
   engine (no optimizer; only when the objective needs it live), the marginal-prior engine
   (its own optimizer and maximum-likelihood steps), checkpoints with the data position, resume,
   NaN stop, Hugging Face export with a reload check.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline import distributed
from pipeline.config import ConfigError, RunConfig, TrainConfig, config_hash
from pipeline.data import DataError
from pipeline.objectives import MIDPOObjective
from pipeline.runstore import RunStore, StageError, atomic_write_json


class TrainingError(StageError):
    """Training cannot go on (non-finite loss, export mismatch); the message says where and why."""


# ================================================================================================
# 1. Data
# ================================================================================================


@dataclass
class TruncationReport:
    pairs: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0  # pairs with at least one response cut
    dropped_empty_response: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class PairData:
    """Tokenised pairs, columnar. Per-token extras align with the (truncated) responses."""

    pair_ids: list[str]
    prompts: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]
    ref_chosen: list[list[float]] | None = None
    ref_rejected: list[list[float]] | None = None
    chosen_weights: list[list[float]] | None = None
    rejected_weights: list[list[float]] | None = None
    report: TruncationReport = field(default_factory=TruncationReport)
    source: str = ""

    def __len__(self) -> int:
        return len(self.pair_ids)

    @property
    def lengths(self) -> list[int]:
        """Padded length each pair needs: prompt + the longer response."""
        return [
            len(p) + max(len(c), len(r))
            for p, c, r in zip(self.prompts, self.chosen, self.rejected, strict=True)
        ]

    @property
    def has_ref_logps(self) -> bool:
        return self.ref_chosen is not None

    @property
    def has_weights(self) -> bool:
        return self.chosen_weights is not None

    def signature(self) -> str:
        """Identifies the exact training data (a checkpoint is only resumed on the same data)."""
        return config_hash([self.pair_ids, self.lengths])


def truncate_pair(
    prompt: list[int],
    chosen: list[int],
    rejected: list[int],
    max_length: int,
    max_prompt_length: int,
) -> tuple[list[int], list[int], list[int], bool, bool]:
    """Fit prompt + response into ``max_length``: keep the prompt's end, the responses' start.

    Returns (prompt, chosen, rejected, prompt_cut, response_cut).
    """
    prompt_cut = len(prompt) > max_prompt_length
    if prompt_cut:
        prompt = prompt[-max_prompt_length:]
    room = max_length - len(prompt)
    response_cut = len(chosen) > room or len(rejected) > room
    return prompt, chosen[:room], rejected[:room], prompt_cut, response_cut


def _token_list(value: Any, where: str, name: str) -> list[int]:
    if value is None or isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise DataError(f"{where}: field '{name}' must be a list of token ids, got {value!r:.60}")
    out = list(value)
    for v in out:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise DataError(f"{where}: field '{name}' has {v!r}, expected token ids (ints >= 0)")
    return [int(v) for v in out]


def _float_list(value: Any, n: int, where: str, name: str) -> list[float]:
    out = [float(v) for v in value]
    if len(out) < n:
        raise DataError(f"{where}: field '{name}' has {len(out)} values for {n} response tokens")
    bad = [i for i, v in enumerate(out[:n]) if not math.isfinite(v)]
    if bad:
        raise DataError(f"{where}: field '{name}' has NaN/inf at token(s) {bad[:5]}")
    return out[:n]


def _log_probs(value: Any, n: int, where: str, name: str) -> list[float]:
    out = _float_list(value, n, where, name)
    bad = [i for i, v in enumerate(out) if v > 1e-3]  # a probability above 1 (beyond rounding)
    if bad:
        raise DataError(f"{where}: field '{name}' has positive log-probs at token(s) {bad[:5]}")
    return out


PAIR_COLUMNS = ("prompt_token_ids", "chosen_token_ids", "rejected_token_ids")


def load_pairs(path: Path, *, max_length: int, max_prompt_length: int) -> PairData:
    """Read pairs.parquet, validate every row, truncate to the model limits (and count).

    Pairs with an empty chosen or rejected response carry no preference signal and would give a
    constant loss: they are dropped and counted. Reference log-probs and token weights are kept
    only when every row has them (they are all-or-nothing per dataset).
    """
    import pyarrow.parquet as pq

    if not path.is_file():
        raise StageError(f"{path} does not exist: run `make score` first")
    table = pq.read_table(path)
    if table.num_rows == 0:
        raise StageError(
            f"{path}: no training pairs (the file is empty); nothing to train on. "
            "Check the score stage's drop counts (ties, truncation)"
        )
    missing = [c for c in PAIR_COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (score stage schema)")
    rows = table.to_pylist()
    report = TruncationReport(pairs=len(rows))
    data = PairData([], [], [], [], source=str(path))
    ref_rows: list[tuple[list[float], list[float]]] = []
    weight_rows: list[tuple[list[float], list[float]]] = []
    with_ref = with_weights = True
    for i, row in enumerate(rows):
        where = f"{path}: row {i}"
        prompt = _token_list(row["prompt_token_ids"], where, "prompt_token_ids")
        chosen = _token_list(row["chosen_token_ids"], where, "chosen_token_ids")
        rejected = _token_list(row["rejected_token_ids"], where, "rejected_token_ids")
        if not prompt:
            raise DataError(f"{where}: field 'prompt_token_ids' is empty")
        if not chosen or not rejected:
            report.dropped_empty_response += 1
            continue
        ref_c, ref_r = row.get("ref_chosen_logps") or [], row.get("ref_rejected_logps") or []
        w_c, w_r = row.get("chosen_weights") or [], row.get("rejected_weights") or []
        prompt, chosen_t, rejected_t, p_cut, r_cut = truncate_pair(
            prompt, chosen, rejected, max_length, max_prompt_length
        )
        report.prompt_truncated += p_cut
        report.response_truncated += r_cut
        with_ref = with_ref and bool(ref_c) and bool(ref_r)
        if ref_c and ref_r:
            # Validated against the full responses, then cut like them.
            full_c = _log_probs(ref_c, len(chosen), where, "ref_chosen_logps")
            full_r = _log_probs(ref_r, len(rejected), where, "ref_rejected_logps")
            ref_rows.append((full_c[: len(chosen_t)], full_r[: len(rejected_t)]))
        with_weights = with_weights and bool(w_c) and bool(w_r)
        if w_c and w_r:
            full_wc = _float_list(w_c, len(chosen), where, "chosen_weights")
            full_wr = _float_list(w_r, len(rejected), where, "rejected_weights")
            weight_rows.append((full_wc[: len(chosen_t)], full_wr[: len(rejected_t)]))
        pid = row.get("prompt_id")
        data.pair_ids.append(f"{pid}#{i}" if pid is not None else f"row{i}")
        data.prompts.append(prompt)
        data.chosen.append(chosen_t)
        data.rejected.append(rejected_t)
    if with_ref and ref_rows and len(ref_rows) == len(data):
        data.ref_chosen = [c for c, _ in ref_rows]
        data.ref_rejected = [r for _, r in ref_rows]
    if with_weights and weight_rows and len(weight_rows) == len(data):
        data.chosen_weights = [c for c, _ in weight_rows]
        data.rejected_weights = [r for _, r in weight_rows]
    data.report = report
    if not len(data):
        detail = (
            f" ({report.dropped_empty_response} dropped for an empty response)"
            if report.dropped_empty_response
            else ""
        )
        raise StageError(
            f"{path}: no training pairs{detail}; nothing to train on. Check the "
            "score stage's drop counts (ties, truncation) or generate more samples"
        )
    return data


def check_vocabulary(data: PairData, vocab_size: int) -> None:
    for i, seqs in enumerate(zip(data.prompts, data.chosen, data.rejected, strict=True)):
        top = max(max(s) for s in seqs)
        if top >= vocab_size:
            raise DataError(
                f"{data.source}: pair {data.pair_ids[i]} has token id {top} >= the "
                f"model's vocabulary size {vocab_size}: pairs from another tokenizer?"
            )


# ================================================================================================
# 2. Order: deterministic from (seed, epoch), bucketed by length, resumable at any step
# ================================================================================================


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
    ref_logps: Tensor | None = None  # [2B, T] precomputed, aligned with labels
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

    @property
    def num_pairs(self) -> int:
        return int(self.row_weight.shape[0])

    def to(self, device: torch.device) -> MicroBatch:
        moved = {
            k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()
        }
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
) -> MicroBatch:
    """Pad one micro-batch. An empty ``indices`` gives one filler pair (weight 0)."""
    real = len(indices)
    rows = indices if indices else [filler]
    seqs: list[list[int]] = []
    prompt_lens: list[int] = []
    responses: list[list[int]] = []
    for side in ("chosen", "rejected"):
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
        assert data.ref_chosen is not None and data.ref_rejected is not None
        batch.ref_logps = per_token(data.ref_chosen, data.ref_rejected)
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
    if share_prompt:
        pack_pairs(batch, [data.prompts[j] for j in rows], responses, pad_id)
    return batch


PROMPT, CHOSEN, REJECTED = 1, 2, 3  # segment ids of the shared-prompt layout (0: padding)
# Mean |log-prob difference| per response token allowed between the shared-prompt and the
# two-sequence forward (bf16 rounds differently for different shapes; a broken mask gives ~1).
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


def decoder_outputs(lm: Any, batch: MicroBatch, hidden_states: bool = False) -> Any:
    """The decoder's outputs in the usual [2B, T, ...] layout, from the shared-prompt layout
    when the batch has one (``last_hidden_state``, and ``hidden_states`` when asked)."""
    decoder = _decoder(lm)
    if batch.packed_ids is None:
        return decoder(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            output_hidden_states=hidden_states,
        )
    assert batch.packed_segments is not None and batch.unpack_index is not None
    dtype = lm.get_input_embeddings().weight.dtype
    out = decoder(
        input_ids=batch.packed_ids,
        attention_mask=shared_prompt_mask(batch.packed_segments, dtype),
        position_ids=batch.packed_positions,
        output_hidden_states=hidden_states,
    )
    pairs = batch.packed_ids.shape[0]
    rows = (torch.arange(2 * pairs, device=batch.packed_ids.device) % pairs)[:, None]

    def unpack(t: Tensor) -> Tensor:
        return t[rows, batch.unpack_index]

    out.last_hidden_state = unpack(out.last_hidden_state)
    if hidden_states and out.hidden_states is not None:
        out.hidden_states = tuple(unpack(h) for h in out.hidden_states)
    return out


# ================================================================================================
# 3. DeepSpeed config
# ================================================================================================


def find_ds_config(path: str) -> Path:
    """The DeepSpeed config file: as given, else relative to the repository (``make`` anywhere)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    repo = Path(__file__).resolve().parent.parent / path
    if not p.is_absolute() and repo.is_file():
        return repo
    raise ConfigError(f"train.ds_config: DeepSpeed config {path} not found")


# Floor for the "auto" ZeRO bucket sizes (elements). The Hugging Face fill (hidden², 0.9·hidden²)
# gives a small model (SmolLM2: 576² = 0.33M) hundreds of tiny collectives a step, each one a sync
# point between ranks; 1e7 (20 MB in bf16) leaves models with hidden size >= 3163 unchanged.
MIN_BUCKET_ELEMENTS = 10_000_000


def deepspeed_config(
    path: str, train: TrainConfig, world_size: int, hidden_size: int | None = None
) -> dict[str, Any]:
    """Load a DeepSpeed JSON, fill "auto" from the run config, reject contradictions.

    Filled like the Hugging Face integration: batch sizes, accumulation, clipping, precision and
    the ZeRO bucket sizes from the model's hidden size. The optimizer and LR schedule come from
    the run config (the prior has its own parameter group), so the JSON must not define them.
    """
    file = find_ds_config(path)
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{file}: top level must be a JSON object")
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise ConfigError(
                f"{file}: remove '{key}': the optimizer and learning-rate schedule come from the "
                "run config (train.learning_rate, prior_learning_rate, weight_decay, "
                "warmup_ratio, lr_scheduler)"
            )
    micro, accum = train.per_device_batch_size, train.gradient_accumulation_steps
    errors: list[str] = []

    def fill(tree: dict[str, Any], key: str, value: Any, source: str, dotted: str) -> None:
        given = tree.get(key, "auto")
        if given == "auto":
            tree[key] = value
        elif given != value:
            errors.append(
                f"{file}: {dotted} is {given!r} but {source} gives {value!r}; set it to "
                '"auto" or make them agree'
            )

    fill(
        cfg,
        "train_micro_batch_size_per_gpu",
        micro,
        "train.per_device_batch_size",
        "train_micro_batch_size_per_gpu",
    )
    fill(
        cfg,
        "gradient_accumulation_steps",
        accum,
        "train.gradient_accumulation_steps",
        "gradient_accumulation_steps",
    )
    fill(
        cfg,
        "train_batch_size",
        micro * accum * world_size,
        f"per_device_batch_size x gradient_accumulation_steps x {world_size} ranks",
        "train_batch_size",
    )
    fill(cfg, "gradient_clipping", train.max_grad_norm, "train.max_grad_norm", "gradient_clipping")
    for name, enabled in (("bf16", train.precision == "bf16"), ("fp16", False)):
        section = cfg.setdefault(name, {})
        if not isinstance(section, dict):
            errors.append(f"{file}: '{name}' must be an object")
            continue
        source = f"train.precision={train.precision!r}"
        if name == "fp16" and section.get("enabled") is True:
            errors.append(
                f"{file}: fp16.enabled is true: fp16 is not supported (use "
                "train.precision=bf16 or fp32)"
            )
        else:
            fill(section, "enabled", enabled, source, f"{name}.enabled")
    zero = cfg.setdefault("zero_optimization", {"stage": 3})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        errors.append(f"{file}: zero_optimization.stage is {stage!r}; expected 0, 1, 2 or 3")
    hidden = hidden_size or 1024
    for key, value in (
        ("reduce_bucket_size", max(hidden**2, MIN_BUCKET_ELEMENTS)),
        ("stage3_prefetch_bucket_size", max(int(0.9 * hidden**2), MIN_BUCKET_ELEMENTS)),
        ("stage3_param_persistence_threshold", 10 * hidden),
    ):
        if zero.get(key) == "auto":
            zero[key] = value
    leftover = [k for k, v in _walk(cfg) if v == "auto"]
    if leftover:
        errors.append(f'{file}: cannot fill "auto" for {", ".join(leftover)}')
    if errors:
        raise ConfigError("\n".join(errors))
    # Torch AdamW (no FusedAdam build); also accepted beside ZeRO-Offload.
    cfg.setdefault("zero_allow_untested_optimizer", True)
    if zero.get("offload_optimizer"):
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


def _walk(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def frozen_engine_config(ds: dict[str, Any]) -> dict[str, Any]:
    """The config of an engine without optimizer (the reference): same sharding and precision."""
    out = json.loads(json.dumps(ds))
    out.get("zero_optimization", {}).pop("offload_optimizer", None)
    return out


# ================================================================================================
# 4. Models
# ================================================================================================


def _decoder(lm: Any) -> nn.Module:
    """The transformer body of a Hugging Face causal LM (final hidden states, no head)."""
    body: nn.Module = getattr(lm, lm.base_model_prefix)
    return body


def _layer_classes(lm: nn.Module) -> list[type[nn.Module]]:
    """The model's transformer-block classes (``_no_split_modules``).

    Made ZeRO-3 leaves, each block's parameters are gathered and released together, once per
    pass, instead of module by module: far fewer hook calls per step, the same numbers.
    """
    names = set(getattr(lm, "_no_split_modules", None) or [])
    return list({type(m) for m in lm.modules() if type(m).__name__ in names})


def release_freed_memory() -> None:
    """Hand memory freed while loading (full state dicts, casts) back to the OS.

    glibc keeps freed heap pages mapped, so they would count in every later peak; a few hundred
    MB for SmolLM2-135M. A no-op where libc has no ``malloc_trim``.
    """
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _shift_right(hidden: Tensor) -> Tensor:
    """Position t gets the state that predicts token t (the state at t - 1)."""
    return torch.cat([torch.zeros_like(hidden[:, :1]), hidden[:, :-1]], dim=1)


def scatter_prompt_free(
    values: Tensor, free_mask: Tensor, prompt_lengths: Tensor, shape: torch.Size
) -> tuple[Tensor, Tensor]:
    """Prompt-free per-token values [N, Tr] -> full-sequence layout [N, T] (and its mask)."""
    rows, cols = free_mask.nonzero(as_tuple=True)
    full = values.new_zeros(shape)
    mask = torch.zeros(shape, dtype=torch.bool, device=values.device)
    targets = prompt_lengths[rows] + cols
    full[rows, targets] = values[rows, cols]
    mask[rows, targets] = True
    return full, mask


class PromptFreeModule(nn.Module):
    """Per-token log-probs of responses scored without their prompt: log p(y_t | y_<t).

    The first response token has nothing before it and is not scored. This is the marginal
    prior's model (trained by maximum likelihood) and RMiPO's prompt-free policy pass.
    """

    def __init__(self, lm: Any, chunk_size: int) -> None:
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size

    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        return prompt_free_logps(self.lm, MicroBatch(**batch), self.chunk_size)


def prompt_free_logps(lm: Any, batch: MicroBatch, chunk_size: int) -> tuple[Tensor, Tensor]:
    """(logps [2B, Tr], scored mask [2B, Tr]) of each response alone."""
    from pipeline.objectives import response_token_stats

    assert batch.free_ids is not None and batch.free_attention_mask is not None
    hidden = _decoder(lm)(
        input_ids=batch.free_ids, attention_mask=batch.free_attention_mask
    ).last_hidden_state
    mask = batch.free_attention_mask.bool().clone()
    mask[:, 0] = False
    stats = response_token_stats(
        hidden, batch.free_ids, mask, lm.get_output_embeddings(), chunk_size=chunk_size
    )
    return stats.logps, mask


@dataclass
class ReferenceOutputs:
    """What the reference engine hands the policy for one micro-batch."""

    logps: Tensor | None = None  # [2B, T] token log-probs (when no KL is needed)
    hidden: Tensor | None = None  # [2B, T, H] final hidden states (for KL on the policy side)
    layer_hidden: Tensor | None = None  # [2B, T, (L,) H] shifted, for SparsePO masks


class ReferenceModule(nn.Module):
    """The frozen reference: token log-probs, or hidden states for the policy's KL chunks."""

    def __init__(self, lm: Any, chunk_size: int) -> None:
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size

    @property
    def head(self) -> nn.Module:
        head: nn.Module = self.lm.get_output_embeddings()
        return head

    def forward(
        self, fields: dict[str, Any], want_logps: bool, want_hidden: bool, hidden_layers: int
    ) -> dict[str, Tensor | None]:
        from pipeline.objectives import response_token_stats

        batch = MicroBatch(**fields)
        out = decoder_outputs(self.lm, batch, hidden_states=hidden_layers > 1)
        hidden = out.last_hidden_state
        result = ReferenceOutputs()
        if want_logps:
            result.logps = response_token_stats(
                hidden, batch.input_ids, batch.response_mask, self.head, chunk_size=self.chunk_size
            ).logps
        if want_hidden:
            result.hidden = hidden
        if hidden_layers == 1:
            result.layer_hidden = _shift_right(hidden)
        elif hidden_layers > 1:
            layers = torch.stack(out.hidden_states[-hidden_layers:], dim=2)
            result.layer_hidden = _shift_right(layers)
        return dict(result.__dict__)


class ObjectiveCall(nn.Module):
    """The objective as ZeRO-3 needs it: tensors in (positional), a tuple of tensors out.

    It is a ZeRO-3 "leaf": the prior's few parameters are gathered together when it runs, and
    their gradients are reduced by a module backward hook, which PyTorch only calls for tensor
    arguments and tuple-of-tensor outputs (never through PairBatch or ObjectiveOutput).
    """

    def __init__(self, objective: MIDPOObjective) -> None:
        super().__init__()
        self.objective = objective
        self.metrics: dict[str, float] = {}

    def forward(self, *values: Tensor | None) -> tuple[Tensor, Tensor]:
        from dataclasses import fields

        from pipeline.objectives import PairBatch

        names = [f.name for f in fields(PairBatch)]
        out = self.objective(PairBatch(**dict(zip(names, values, strict=True))))  # type: ignore[arg-type]
        self.metrics = out.metrics
        return out.loss, out.losses

    def call(self, batch_fields: dict[str, Tensor]) -> dict[str, Any]:
        """Run on named PairBatch fields; {"loss", "losses", "metrics"}."""
        from dataclasses import fields

        from pipeline.objectives import PairBatch

        loss, losses = self(*(batch_fields.get(f.name) for f in fields(PairBatch)))
        return {"loss": loss, "losses": losses, "metrics": self.metrics}


class PolicyModule(nn.Module):
    """What the policy engine wraps: the causal LM and the objective (its prior parameters).

    ``forward`` returns {"loss", "losses" [B], "metrics"} for one micro-batch (a dict of fields
    of ``MicroBatch``); ``mode="logps"`` returns the per-token log-probs only.
    """

    def __init__(self, lm: Any, objective: MIDPOObjective, chunk_size: int) -> None:
        super().__init__()
        self.lm = lm
        self.objective_call = ObjectiveCall(objective)
        self.chunk_size = chunk_size

    @property
    def objective(self) -> MIDPOObjective:
        return self.objective_call.objective

    def forward(
        self,
        fields: dict[str, Any],
        ref: dict[str, Tensor | None] | None = None,
        ref_head: nn.Module | None = None,
        marginal: tuple[Tensor, Tensor] | None = None,
        mode: str = "loss",
    ) -> Any:
        from pipeline.objectives import response_token_stats
        from pipeline.objectives.batch import SIDE_FIELDS

        batch = MicroBatch(**fields)
        obj = self.objective
        hidden = decoder_outputs(self.lm, batch).last_hidden_state
        requires: frozenset[str] = obj.requires if mode == "loss" else frozenset()
        # Optional fields (RMiPO's chosen_marginal_mask) are passed whenever the objective reads them.
        reads: frozenset[str] = obj.accepts if mode == "loss" else frozenset()
        want_kl = bool(requires & {"chosen_kl", "chosen_reverse_kl"})
        ref_hidden = ref.get("hidden") if (want_kl and ref is not None) else None
        stats = response_token_stats(
            hidden,
            batch.input_ids,
            batch.response_mask,
            self.lm.get_output_embeddings(),
            ref_hidden=ref_hidden,
            ref_lm_head=ref_head if ref_hidden is not None else None,
            kl="chosen_kl" in requires,
            reverse_kl="chosen_reverse_kl" in requires,
            chunk_size=self.chunk_size,
        )
        if mode == "logps":
            return stats.logps
        b = batch.num_pairs
        mask = batch.response_mask

        def split(generic: str, t: Tensor | None) -> dict[str, Tensor]:
            """[2B, ...] -> the chosen and rejected fields, if the objective reads them."""
            chosen, rejected = SIDE_FIELDS[generic]
            if t is None or chosen not in reads:
                return {}
            return {chosen: t[:b], rejected: t[b:]}

        ref_logps = stats.ref_logps
        if ref_logps is None and ref is not None:
            ref_logps = ref.get("logps")
        if ref_logps is None:
            ref_logps = batch.ref_logps
        fields_out: dict[str, Tensor] = {
            "chosen_logps": stats.logps[:b],
            "rejected_logps": stats.logps[b:],
            "chosen_mask": mask[:b],
            "rejected_mask": mask[b:],
        }
        if obj.needs_marginal_logps:
            if marginal is None:  # the policy itself, prompt-free, no gradient (RMiPO)
                with torch.no_grad():
                    marginal = prompt_free_logps(self.lm, batch, self.chunk_size)
            assert batch.prompt_lengths is not None
            full, full_mask = scatter_prompt_free(
                marginal[0].detach(), marginal[1], batch.prompt_lengths, mask.shape
            )
            fields_out |= split("marginal_logps", full) | split("marginal_mask", full_mask)
        fields_out |= split("ref_hidden", ref.get("layer_hidden") if ref is not None else None)
        fields_out |= split("kl", stats.kl) | split("reverse_kl", stats.reverse_kl)
        fields_out |= split("ref_logps", ref_logps) | split("weights", batch.weights)
        return self.objective_call.call(fields_out)


# ================================================================================================
# 5. Trainer
# ================================================================================================


def lr_lambda(kind: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier for optimizer step s (0-based): linear warmup, then decay.

    Warmup starts at 1/(w+1), not 0, so the first step already learns.
    """

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return fn


def parameter_groups(
    model: nn.Module, objective: nn.Module, lr: float, weight_decay: float, prior_lr: float
) -> list[dict[str, Any]]:
    """Model weights (decay on matrices only) and the prior's parameters (own learning rate)."""
    prior_ids = {id(p) for p in objective.parameters()}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if not p.requires_grad or id(p) in prior_ids:
            continue
        shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3 placeholders have shape [0]
        (decay if len(shape) >= 2 else no_decay).append(p)
    groups: list[dict[str, Any]] = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "model"},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "model_no_decay"},
    ]
    prior = [p for p in objective.parameters() if p.requires_grad]
    if prior:
        groups.append({"params": prior, "lr": prior_lr, "weight_decay": 0.0, "name": "prior"})
    return [g for g in groups if g["params"]]


def restore_float32_buffers(model: nn.Module) -> int:
    """Give computed buffers (rotary inv_freq) back their float32 values; returns how many.

    ZeRO-3's partitioned construction (zero.Init) creates every floating tensor in the training
    dtype, so under bf16 the rotary frequencies are rounded (0.5625 for 0.5623): the engine would
    train with other position encodings than the exported model runs with. Such buffers are not
    in the checkpoint; a fresh copy of their module, built outside zero.Init, has them right.
    """
    fixed = 0
    for module in model.modules():
        names = [
            name
            for name in getattr(module, "_non_persistent_buffers_set", ())
            if (buf := module._buffers.get(name)) is not None
            and buf.is_floating_point()
            and buf.dtype != torch.float32
        ]
        if not names or not hasattr(module, "config"):
            continue
        try:
            fresh = type(module)(module.config)
        except Exception:  # not rebuildable from its config: leave it
            continue
        for name in names:
            value = fresh._buffers.get(name)
            if value is not None and value.dtype == torch.float32:
                module._buffers[name] = value.to(module._buffers[name].device)  # type: ignore[union-attr]
                fixed += 1
    return fixed


def partition_report(module: nn.Module) -> dict[str, Any]:
    """How much of each parameter this rank holds (ZeRO-3: about 1/world of each)."""
    fractions: list[float] = []
    local = full = 0
    for p in module.parameters():
        numel = int(getattr(p, "ds_numel", p.numel()))
        held = int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else p.numel()
        local += held
        full += numel
        fractions.append(held / max(1, numel))
    return {
        "params": len(fractions),
        "local_numel": local,
        "full_numel": full,
        "min_fraction": min(fractions, default=0.0),
        "max_fraction": max(fractions, default=0.0),
    }


def gathered_state_dict(module: nn.Module, is_main: bool) -> dict[str, Tensor]:
    """The full state dict on rank 0 (empty elsewhere), gathered one parameter at a time.

    Works for any ZeRO stage (GatheredParameters is a no-op for unpartitioned parameters); all
    ranks must call it. Tied parameters appear once, under their first name.
    """
    import deepspeed

    state: dict[str, Tensor] = {}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if is_main:
                state[name] = param.detach().to("cpu", copy=True)
    if is_main:
        non_persistent = {
            f"{m}.{b}".lstrip(".")
            for m, sub in module.named_modules()
            for b in getattr(sub, "_non_persistent_buffers_set", ())
        }
        for name, buf in module.named_buffers():
            if name not in non_persistent:
                state[name] = buf.detach().to("cpu", copy=True)
    return state


@dataclass
class TrainPlan:
    """Everything a rank needs to train, resolved by the stage before the engines exist."""

    train: TrainConfig
    data: PairData
    policy_dir: Path
    reference_dir: Path
    reference_mode: str  # "none", "precomputed", "live"
    ds_config: dict[str, Any]
    checkpoint_dir: Path
    output_dir: Path | None  # rank 0: where the HF folder goes; None elsewhere
    world_size: int
    max_length: int
    objective: MIDPOObjective  # the MI-DPO objective (with its learnable prior, if any)
    log: Callable[[int, dict[str, float]], None] | None = None  # rank 0: per-step metrics sink
    export: bool = True  # write the Hugging Face folder (and check it) at the end
    checkpoints: bool = True  # save DeepSpeed checkpoints (every N steps and at the end)

    @property
    def global_batch(self) -> int:
        t = self.train
        return t.per_device_batch_size * t.gradient_accumulation_steps * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.data) / self.global_batch)

    @property
    def total_steps(self) -> int:
        return self.train.max_steps or self.train.epochs * self.steps_per_epoch


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    resumed_from: int
    export_check: dict[str, Any]
    metrics_path: Path
    tokens_per_s: float
    seconds: float
    history: list[dict[str, float]]  # this run's per-step metrics (every rank has them)


def build_objective(train: TrainConfig) -> MIDPOObjective:
    from pipeline.config import objective_kwargs
    from pipeline.objectives import make_objective

    return make_objective(train.objective, **objective_kwargs(train))


def prior_learning_rate(train: TrainConfig) -> float:
    """The prior group's LR: the objective's own ``prior_lr`` if given, else the run config's."""
    given = train.objective_args.get("prior_lr")
    return float(given) if given is not None else train.prior_learning_rate


def marginal_source(objective: MIDPOObjective) -> str | None:
    """Where the objective's marginal log-probs come from: "policy", "prompt_free_model", None."""
    if not getattr(objective, "needs_marginal_logps", False):
        return None
    return str(getattr(objective, "hparams", {}).get("marginal_source", "policy"))


def reference_hidden_layers(objective: MIDPOObjective) -> int:
    """Reference layers SparsePO's mask heads read (0 when none)."""
    if not getattr(objective, "needs_reference_hidden", False):
        return 0
    for term in getattr(objective, "terms", []):
        head = getattr(term, "reward_head", None)
        if head is not None:
            return int(head.num_layers)
    return 1


class Trainer:
    """One rank's training run. Every rank builds one; rank 0 also logs and exports."""

    def __init__(self, plan: TrainPlan, ranks: distributed.Ranks) -> None:
        self.plan = plan
        self.ranks = ranks
        self.train_cfg = plan.train
        self.objective = plan.objective
        self.marginal_source = marginal_source(self.objective)
        self.ref_layers = reference_hidden_layers(self.objective)
        needs_ref = bool(
            self.objective.needs_reference_logps
            or self.objective.needs_reference_distribution
            or self.ref_layers
        )
        self.live_reference = needs_ref and plan.reference_mode == "live"
        self.dtype = torch.bfloat16 if plan.train.precision == "bf16" else torch.float32
        self.device = distributed.current_device()
        self.lengths = plan.data.lengths
        self.pad_id = 0
        self._hf_ds_config: Any = None

    # -- building the engines ------------------------------------------------------------------
    def _load_lm(self, folder: Path, train: bool) -> Any:
        from transformers import AutoModelForCausalLM

        lm = AutoModelForCausalLM.from_pretrained(str(folder), dtype=self.dtype)
        restore_float32_buffers(lm)
        lm.config.use_cache = False
        if train and self.train_cfg.gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not train:
            lm.requires_grad_(False)
            lm.eval()
        return lm

    def build(self) -> None:
        import deepspeed
        from deepspeed.utils import set_z3_leaf_modules
        from transformers.integrations import HfDeepSpeedConfig

        from pipeline.models import load_tokenizer

        t, ds = self.train_cfg, self.plan.ds_config
        tokenizer = load_tokenizer(self.plan.policy_dir)
        self.tokenizer = tokenizer
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        # While this object lives, from_pretrained builds ZeRO-3 models already partitioned
        # (zero.Init): no rank ever holds a full copy of a large model.
        self._hf_ds_config = HfDeepSpeedConfig(ds)
        total = self.plan.total_steps
        schedule = lr_lambda(t.lr_scheduler, total, int(t.warmup_ratio * total))

        lm = self._load_lm(self.plan.policy_dir, train=True)
        check_vocabulary(self.plan.data, int(lm.config.vocab_size))
        self.lm = lm
        module = PolicyModule(lm, self.objective, t.token_chunk_size)
        # The objective's few prior parameters are gathered together when it is called.
        set_z3_leaf_modules(module, [ObjectiveCall, *_layer_classes(lm)])
        groups = parameter_groups(
            module, self.objective, t.learning_rate, t.weight_decay, prior_learning_rate(t)
        )
        optimizer = self._optimizer(groups)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            config=ds,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        )
        self.group_names = [g.get("name", str(i)) for i, g in enumerate(groups)]

        self.ref_engine = None
        if self.live_reference:
            ref_lm = self._load_lm(self.plan.reference_dir, train=False)
            self.ref_engine, *_ = deepspeed.initialize(
                model=ReferenceModule(ref_lm, t.token_chunk_size), config=frozen_engine_config(ds)
            )
            self.ref_engine.eval()

        self.marginal_engine = None
        if self.marginal_source == "prompt_free_model":
            # Lemma 1's prior: a prompt-free copy of the reference, fitted to the policy's
            # responses by maximum likelihood with its own optimizer.
            m_lm = self._load_lm(self.plan.reference_dir, train=True)
            m_module = PromptFreeModule(m_lm, t.token_chunk_size)
            m_lr = t.marginal_prior_learning_rate or t.learning_rate
            m_groups = parameter_groups(m_module, nn.Module(), m_lr, t.weight_decay, m_lr)
            self.marginal_engine, *_ = deepspeed.initialize(
                model=m_module,
                optimizer=self._optimizer(m_groups),
                config=ds,
                lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            )
        release_freed_memory()

    def _optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        offload = self.plan.ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
        if offload.get("device") == "cpu" and distributed.accelerator_name() != "cpu":
            # Optimizer states on the CPU of a GPU node: DeepSpeed's vectorised CPU Adam.
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, lr=self.train_cfg.learning_rate, adamw_mode=True)
        # Fused AdamW: ZeRO hands the optimizer one flat tensor per group, and the default
        # "foreach" kernels allocate several temporaries of that size at every step (+1.5 GB
        # peak for a 135M model); the fused kernel updates in place.
        return torch.optim.AdamW(groups, lr=self.train_cfg.learning_rate, fused=True)

    def partition(self) -> dict[str, Any]:
        out: dict[str, Any] = {"policy": partition_report(self.engine.module.lm)}
        if self.ref_engine is not None:
            out["reference"] = partition_report(self.ref_engine.module)
        if self.marginal_engine is not None:
            out["marginal_prior"] = partition_report(self.marginal_engine.module)
        out["rank"] = self.ranks.rank
        return out

    # -- one micro-batch -----------------------------------------------------------------------
    def _micro_batch(self, indices: list[int], filler: int) -> MicroBatch:
        data = self.plan.data
        batch = collate(
            data,
            indices,
            filler,
            self.pad_id,
            ref_logps=self.plan.reference_mode == "precomputed",
            weights=data.has_weights
            and bool(self.objective.requires & {"chosen_weights", "rejected_weights"}),
            prompt_free=self.marginal_source is not None,
            share_prompt=self.train_cfg.share_prompt,
        )
        return batch.to(self.device)

    def _reference(self, batch: MicroBatch) -> dict[str, Tensor | None] | None:
        if self.ref_engine is None:
            return None
        with torch.no_grad():
            out: dict[str, Tensor | None] = self.ref_engine(
                batch.as_dict(),
                want_logps=not self.objective.needs_reference_distribution,
                want_hidden=self.objective.needs_reference_distribution,
                hidden_layers=self.ref_layers,
            )
        return out

    def _marginal(self, batch: MicroBatch) -> tuple[Tensor, Tensor] | None:
        if self.marginal_engine is None:
            return None
        with torch.no_grad():
            out: tuple[Tensor, Tensor] = self.marginal_engine(batch.as_dict())
        return out

    def check_shared_prompt(self) -> None:
        """The shared-prompt forward must give the two-sequence forward's log-probs.

        A model whose attention ignores custom 4D masks (e.g. flash-attention-2) would let the
        rejected response see the chosen one; this catches it before any step.
        """
        batch = self._micro_batch(list(range(min(2, len(self.plan.data)))), filler=0)
        separate = dataclasses.replace(batch, packed_ids=None)
        self.engine.eval()
        with torch.no_grad():
            shared_logps = self.engine(batch.as_dict(), mode="logps")
            separate_logps = self.engine(separate.as_dict(), mode="logps")
        self.engine.empty_partition_cache()  # no-grad passes can leave blocks gathered
        self.engine.train()
        mask = batch.response_mask
        diff = float(((shared_logps - separate_logps).abs() * mask).sum() / mask.sum())
        limit = SHARED_PROMPT_TOLERANCE[self.train_cfg.precision]
        if diff > limit:
            raise TrainingError(
                f"train.share_prompt: this model's shared-prompt forward differs from two "
                f"separate sequences by {diff:.3g} nats per token (limit {limit}); its attention "
                "probably ignores custom 4D masks. Set train.share_prompt=false"
            )

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        plan, t = self.plan, self.train_cfg
        total = plan.total_steps
        accum, world, rank = t.gradient_accumulation_steps, self.ranks.world_size, self.ranks.rank
        start = self.resume()
        if t.share_prompt:
            self.check_shared_prompt()
        metrics_path = plan.checkpoint_dir / "metrics.jsonl"
        main = self.ranks.is_main
        if main:
            plan.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            _truncate_metrics(metrics_path, start)
        from tqdm import tqdm

        bar = tqdm(
            total=total,
            initial=start,
            unit="step",
            desc="train",
            disable=not main,
            dynamic_ncols=True,
            file=sys.stderr,
        )
        last_loss = float("nan")
        order_cache: dict[int, list[list[int]]] = {}
        started = time.time()
        tokens_total = 0
        history: list[dict[str, float]] = []
        self.engine.train()
        for step in range(start, total):
            epoch, index = divmod(step, plan.steps_per_epoch)
            if epoch not in order_cache:
                order_cache.clear()
                order_cache[epoch] = epoch_batches(
                    self.lengths, plan.global_batch, t.seed, epoch, t.bucket_window
                )
            global_batch = order_cache[epoch][index]
            micro = split_global_batch(global_batch, self.lengths, world, accum, rank)
            t0 = time.time()
            lrs = self.scheduler.get_last_lr()  # the rates this step uses
            sums, tokens = self._policy_step(step, micro, global_batch)
            if self.marginal_engine is not None and (step + 1) % t.marginal_prior_every == 0:
                sums["marginal/nll"] = self._marginal_step(micro, global_batch)
            metrics = self._finish_metrics(sums, tokens, len(global_batch), epoch, lrs)
            step_time = time.time() - t0  # the whole step: forward, backward, update, metrics
            metrics["step_time_s"] = step_time
            metrics["tokens_per_s"] = metrics["tokens"] / step_time if step_time > 0 else 0.0
            tokens_total += int(metrics["tokens"])
            last_loss = metrics["loss"]
            history.append({"step": step + 1, **metrics})
            if main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps({"step": step + 1, **metrics}) + "\n")
                if plan.log is not None:
                    plan.log(step + 1, metrics)
                bar.set_postfix(
                    loss=f"{last_loss:.4f}",
                    acc=f"{metrics['rewards/accuracies']:.2f}",
                    tok_s=f"{metrics['tokens_per_s']:.0f}",
                )
                bar.update(1)
            if plan.checkpoints and ((step + 1) % t.checkpoint_every == 0 or step + 1 == total):
                self.save_checkpoint(step + 1)
        bar.close()
        if not history and main and metrics_path.is_file():  # resumed after the last step
            lines = metrics_path.read_text().splitlines()
            last_loss = json.loads(lines[-1])["loss"] if lines else last_loss
        seconds = time.time() - started
        export_check = self.export() if plan.export else {}
        return TrainResult(
            steps=total,
            final_loss=last_loss,
            resumed_from=start,
            export_check=export_check,
            metrics_path=metrics_path,
            seconds=seconds,
            history=history,
            tokens_per_s=tokens_total / seconds if seconds > 0 else 0.0,
        )

    def close(self) -> None:
        """Drop the engines (several trainers may run one after another in a process)."""
        import gc

        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        self._hf_ds_config = None
        for name in ("engine", "ref_engine", "marginal_engine", "optimizer", "scheduler", "lm"):
            if hasattr(self, name):
                delattr(self, name)
        gc.collect()

    def _policy_step(
        self, step: int, micro: list[list[int]], global_batch: list[int]
    ) -> tuple[dict[str, float], int]:
        """Forward/backward every micro-batch, then the optimizer step. Returns summed metrics."""
        world, accum = self.ranks.world_size, self.train_cfg.gradient_accumulation_steps
        n_global = len(global_batch)
        scale = world * accum / n_global  # makes the loss a mean over the global batch
        sums: dict[str, float] = {}
        tokens = 0
        for m, indices in enumerate(micro):
            batch = self._micro_batch(indices, filler=global_batch[0])
            ref = self._reference(batch)
            marginal = self._marginal(batch)
            ref_head = self.ref_engine.module.head if self.ref_engine is not None else None
            out = self.engine(batch.as_dict(), ref=ref, ref_head=ref_head, marginal=marginal)
            losses = out["losses"]
            extra = out["loss"] - losses.mean()  # terms beyond the pair losses (SimPO's SFT)
            loss = scale * (
                (losses * batch.row_weight.to(losses.dtype)).sum() + batch.num_real * extra
            )
            if not distributed.all_true(bool(torch.isfinite(loss.detach()).item())):
                self._non_finite(step, m, batch, losses)
            self.engine.backward(loss)
            self.engine.step()
            for key, value in out["metrics"].items():
                sums[key] = sums.get(key, 0.0) + value * batch.num_real
            tokens += batch.num_tokens
        return sums, tokens

    def _marginal_step(self, micro: list[list[int]], global_batch: list[int]) -> float:
        """One maximum-likelihood step of the marginal prior on this step's responses."""
        from pipeline.objectives import marginal_prior_nll

        assert self.marginal_engine is not None
        world, accum = self.ranks.world_size, self.train_cfg.gradient_accumulation_steps
        scale = world * accum / len(global_batch)
        total = 0.0
        self.marginal_engine.train()
        for indices in micro:
            batch = self._micro_batch(indices, filler=global_batch[0])
            logps, mask = self.marginal_engine(batch.as_dict())
            nll = marginal_prior_nll(logps, mask)
            self.marginal_engine.backward(nll * batch.num_real * scale)
            self.marginal_engine.step()
            total += float(nll.detach()) * batch.num_real
        return total

    def _finish_metrics(
        self,
        sums: dict[str, float],
        tokens: int,
        n_global: int,
        epoch: int,
        lrs: list[float],
    ) -> dict[str, float]:
        """Means over the global batch (one all-reduce), plus optimizer and speed figures."""
        import torch.distributed as dist

        keys = sorted(sums)
        values = torch.tensor(
            [sums[k] for k in keys] + [float(tokens)], dtype=torch.float64, device=self.device
        )
        if dist.is_initialized():
            dist.all_reduce(values)
        totals = values.tolist()
        # Sums of (batch mean x real pairs) over micro-batches and ranks / pairs = global means;
        # values that are the same everywhere (learnable prior parameters) come out unchanged.
        metrics = {k: v / n_global for k, v in zip(keys, totals[:-1], strict=True)}
        norm = self.engine.get_global_grad_norm()
        metrics["grad_norm"] = float(norm) if norm is not None else float("nan")
        for name, lr in zip(self.group_names, lrs, strict=False):
            if name != "model_no_decay":
                metrics["lr" if name == "model" else f"lr/{name}"] = float(lr)
        metrics["tokens"] = totals[-1]
        metrics["epoch"] = float(epoch)
        metrics["pairs"] = float(n_global)
        return metrics

    def _non_finite(self, step: int, micro_step: int, batch: MicroBatch, losses: Tensor) -> None:
        bad = [
            pid
            for pid, value in zip(batch.pair_ids, losses.tolist(), strict=False)
            if not math.isfinite(value)
        ]
        everywhere = sorted({p for part in distributed.gather_objects(bad) for p in part})
        latest = read_latest(self.plan.checkpoint_dir)
        kept = f"step {latest['step']} in {self.plan.checkpoint_dir}" if latest else "none yet"
        raise TrainingError(
            f"non-finite loss at optimizer step {step + 1}, micro-batch {micro_step + 1} "
            f"(pairs {', '.join(everywhere) or 'unknown'}); stopped before applying it. Last good "
            f"checkpoint: {kept}. Lower train.learning_rate or fix those pairs, then rerun to "
            "resume"
        )

    # -- checkpoints ---------------------------------------------------------------------------
    def data_position(self, step: int) -> dict[str, int]:
        """Where optimizer step ``step`` leaves the data: epoch, batch in it, pairs consumed."""
        plan = self.plan
        epoch, index = divmod(step, plan.steps_per_epoch)
        order = epoch_batches(
            self.lengths,
            plan.global_batch,
            self.train_cfg.seed,
            epoch,
            self.train_cfg.bucket_window,
        )
        pairs = epoch * len(plan.data) + sum(len(b) for b in order[:index])
        return {"epoch": epoch, "batch_in_epoch": index, "pairs_seen": pairs}

    def save_checkpoint(self, step: int) -> None:
        """Engine (model, optimizer, scheduler) + data position + RNG; then mark it complete.

        The marker (``complete.json``: every file's size and sha256, hashed by the ranks in
        parallel) is written last, so resume can tell a whole checkpoint from a damaged one.
        """
        root, tag = self.plan.checkpoint_dir, f"step{step}"
        state = {
            "step": step,
            "data_signature": self.plan.data.signature(),
            "data_position": self.data_position(step),
        }
        self.engine.save_checkpoint(str(root), tag=tag, client_state=state, save_latest=False)
        if self.marginal_engine is not None:
            self.marginal_engine.save_checkpoint(
                str(root / "marginal_prior"), tag=tag, save_latest=False
            )
        torch.save(_rng_state(), root / tag / f"rng_rank{self.ranks.rank}.pt")
        distributed.barrier()  # every rank's shards are on disk before they are hashed
        mine = _checkpoint_files(root, tag)[self.ranks.rank :: self.ranks.world_size]
        digests: dict[str, Any] = {}
        for part in distributed.gather_objects({name: _file_digest(root / name) for name in mine}):
            digests.update(part)
        if self.ranks.is_main:
            atomic_write_json(root / tag / CHECKPOINT_MARKER, {"step": step, "files": digests})
            atomic_write_json(root / "latest.json", {"tag": tag, "step": step})
            keep = {f"step{s}" for s in _complete_steps(root)[: self.train_cfg.keep_checkpoints]}
            for old in sorted(root.glob("step*")):
                if old.name not in keep:
                    shutil.rmtree(old, ignore_errors=True)
                    shutil.rmtree(root / "marginal_prior" / old.name, ignore_errors=True)
        distributed.barrier()

    def resume(self) -> int:
        """Load the newest intact checkpoint, if any; the optimizer step to continue from.

        A checkpoint whose files do not match its marker (truncated, corrupt, missing) is
        reported and set aside as ``corrupt-stepN``, and the previous one is tried.
        """
        root = self.plan.checkpoint_dir
        for step in _complete_steps(root):
            tag = f"step{step}"
            recorded = json.loads((root / tag / CHECKPOINT_MARKER).read_text())["files"]
            names = sorted(recorded)[self.ranks.rank :: self.ranks.world_size]
            mine = [p for n in names if (p := _digest_problem(root, n, recorded[n]))]
            problems = [p for part in distributed.gather_objects(mine) for p in part]
            if not problems:
                return self._load_checkpoint(tag)
            if self.ranks.is_main:
                print(
                    f"[train] checkpoint {root / tag} is damaged ({'; '.join(problems[:3])}); "
                    "set aside as corrupt-" + tag + ", falling back to the previous checkpoint",
                    file=sys.stderr,
                )
                for folder in (root / tag, root / "marginal_prior" / tag):
                    if folder.is_dir():
                        aside = folder.with_name(f"corrupt-{tag}")
                        shutil.rmtree(aside, ignore_errors=True)
                        os.replace(folder, aside)
            distributed.barrier()
        return 0

    def _load_checkpoint(self, tag: str) -> int:
        root = self.plan.checkpoint_dir
        path, state = self.engine.load_checkpoint(str(root), tag=tag)
        if path is None:
            raise TrainingError(f"checkpoint {root / tag} could not be loaded")
        if state.get("data_signature") != self.plan.data.signature():
            raise TrainingError(
                f"checkpoint {path} was made on other training data; rerun with "
                "--force to start over"
            )
        if self.marginal_engine is not None:
            self.marginal_engine.load_checkpoint(str(root / "marginal_prior"), tag=tag)
        rng_file = root / tag / f"rng_rank{self.ranks.rank}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        step = int(state["step"])
        if state.get("data_position") != self.data_position(step):
            raise TrainingError(
                f"checkpoint {path}: its data position does not match this run's "
                "order (batch sizes or seed changed?); rerun with --force"
            )
        if self.ranks.is_main:
            print(f"[train] resuming from {root / tag} (step {step})", file=sys.stderr)
        return step

    # -- export --------------------------------------------------------------------------------
    def probe_logps(self, count: int = 4) -> tuple[list[str], Tensor]:
        """Sequence log-probs of the first pairs under the engine (the export check's yardstick)."""
        data = self.plan.data
        indices = list(range(min(count, len(data))))
        # Separate sequences, as the reload check computes them: in bf16 the shared-prompt
        # layout rounds differently (that layout is checked against this one before training).
        batch = dataclasses.replace(self._micro_batch(indices, filler=0), packed_ids=None)
        self.engine.eval()
        with torch.no_grad():
            token_logps = self.engine(batch.as_dict(), mode="logps")
        self.engine.empty_partition_cache()  # no-grad passes can leave blocks gathered
        self.engine.train()
        sums = (token_logps * batch.response_mask).sum(dim=1).double().cpu()
        return batch.pair_ids, sums

    def export(self) -> dict[str, Any]:
        """Consolidated Hugging Face folder on rank 0, then reload it and compare log-probs."""
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        ids, engine_logps = self.probe_logps()
        state = gathered_state_dict(self.lm, self.ranks.is_main)
        # From here on from_pretrained must build ordinary (unpartitioned) models.
        unset_hf_deepspeed_config()
        self._hf_ds_config = None
        check: dict[str, Any] = {}
        out = self.plan.output_dir
        if self.ranks.is_main and out is not None:
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            self.lm.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(str(tmp))
            os.replace(tmp, out)
            check = export_check(
                out,
                self._micro_batch(list(range(len(ids))), 0).to(torch.device("cpu")),
                engine_logps,
                ids,
                self.dtype,
                self.train_cfg.token_chunk_size,
            )
        distributed.barrier()
        return check


def export_check(
    folder: Path,
    batch: MicroBatch,
    engine_logps: Tensor,
    ids: list[str],
    dtype: torch.dtype,
    chunk_size: int,
) -> dict[str, Any]:
    """Reload the exported folder with plain transformers; its log-probs must match the engine's."""
    from transformers import AutoModelForCausalLM

    from pipeline.objectives import response_token_stats

    lm = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    lm.eval()
    with torch.no_grad():
        hidden = _decoder(lm)(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state
        stats = response_token_stats(
            hidden,
            batch.input_ids,
            batch.response_mask,
            lm.get_output_embeddings(),
            chunk_size=chunk_size,
        )
    reloaded = (stats.logps * batch.response_mask).sum(dim=1).double()
    diff = float((reloaded - engine_logps).abs().max())
    scale = float(engine_logps.abs().max()) + 1.0
    # Same weights, same inputs: only kernel and threading differences remain.
    tolerance = (1e-3 if dtype == torch.bfloat16 else 1e-4) * scale
    result = {
        "pair_ids": ids,
        "engine_logps": engine_logps.tolist(),
        "reloaded_logps": reloaded.tolist(),
        "max_abs_diff": diff,
        "tolerance": tolerance,
    }
    if not diff <= tolerance:
        raise TrainingError(
            f"exported model {folder} does not reproduce the engine's log-probs "
            f"(max difference {diff:.3g} > {tolerance:.3g})"
        )
    return result


# -- checkpoint helpers ----------------------------------------------------------------------------


def checkpoint_dir(scratch: Path, key: dict[str, Any]) -> Path:
    """Checkpoints live under a key of everything that must match to resume (config, data, world)."""
    return scratch / f"ckpt-{config_hash(key)}"


CHECKPOINT_MARKER = "complete.json"


def read_latest(root: Path) -> dict[str, Any] | None:
    """The newest checkpoint marked complete ({"tag", "step"}); not yet verified."""
    steps = _complete_steps(root)
    return {"tag": f"step{steps[0]}", "step": steps[0]} if steps else None


def _complete_steps(root: Path) -> list[int]:
    """Steps of the checkpoints with a completion marker, newest first."""
    markers = root.glob(f"step*/{CHECKPOINT_MARKER}") if root.is_dir() else []
    return sorted((int(p.parent.name[4:]) for p in markers), reverse=True)


def _checkpoint_files(root: Path, tag: str) -> list[str]:
    """Every file of checkpoint ``tag`` (policy engine, RNG states, marginal prior), relative."""
    folders = [root / tag, root / "marginal_prior" / tag]
    return sorted(
        str(p.relative_to(root))
        for folder in folders
        if folder.is_dir()
        for p in folder.rglob("*")
        if p.is_file() and p.name != CHECKPOINT_MARKER
    )


def _file_digest(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def _digest_problem(root: Path, name: str, recorded: dict[str, Any]) -> str | None:
    """Why checkpoint file ``name`` does not match its recorded size and hash, or None."""
    path = root / name
    if not path.is_file():
        return f"{name} is missing"
    size = path.stat().st_size
    if size != recorded["size"]:
        return f"{name} has {size} bytes, expected {recorded['size']}"
    if _file_digest(path)["sha256"] != recorded["sha256"]:
        return f"{name} does not match its sha256"
    return None


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric lines of steps <= ``step`` (a resumed run rewrites what came after)."""
    if not path.is_file():
        return
    lines = [
        ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step
    ]
    path.write_text("".join(ln + "\n" for ln in lines))


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


# ================================================================================================
# 6. From the run store to a plan
# ================================================================================================


def model_dirs(cfg: RunConfig, store: RunStore) -> tuple[Path, Path, Path]:
    """(policy start, reference, the score stage's reference) model folders.

    The policy starts from the model that generated the pairs (generate.model, else the base);
    the reference is the score stage's unless train.reference_model names another.
    """
    from pipeline.models import check_model_folder

    base = Path(store.require("prepare", check_stale=False)["model_dir"])
    generated = store.complete_manifest("generate")
    sampler = Path(generated["model_dir"]) if generated and generated.get("model_dir") else base
    score_ref = Path(cfg.score.reference_model).expanduser() if cfg.score.reference_model else base
    policy = Path(cfg.train.init_model).expanduser() if cfg.train.init_model else sampler
    reference = (
        Path(cfg.train.reference_model).expanduser() if cfg.train.reference_model else score_ref
    )
    allow = cfg.model.allow_pickle_weights
    for key, folder in (("train.init_model", policy), ("train.reference_model", reference)):
        try:
            check_model_folder(folder, allow_pickle=allow)
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None
    return policy.resolve(), reference.resolve(), score_ref.resolve()


def choose_reference(
    objective: MIDPOObjective, train: TrainConfig, data: PairData, same_as_score: bool
) -> str:
    """ "none", "precomputed" (pairs.parquet's log-probs) or "live" (a reference engine)."""
    needs_live = bool(objective.needs_reference_distribution or reference_hidden_layers(objective))
    if not (objective.needs_reference_logps or needs_live):
        return "none"
    if needs_live:
        if train.reference == "precomputed":
            raise ConfigError(
                f"train.reference=precomputed: objective {train.objective!r} needs the reference's "
                "full distribution or activations at every step, which no precompute serves; "
                "use train.reference=auto"
            )
        return "live"
    if train.reference == "live":
        return "live"
    if data.has_ref_logps and same_as_score:
        return "precomputed"
    if train.reference == "precomputed":
        why = (
            "pairs.parquet has no reference log-probs (score.reference_logps=none?)"
            if not data.has_ref_logps
            else "train.reference_model differs from the score stage's reference"
        )
        raise ConfigError(f"train.reference=precomputed: {why}")
    return "live"


def make_plan(
    cfg: RunConfig,
    store: RunStore,
    world_size: int,
    *,
    output_dir: Path | None = None,
    log: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainPlan:
    """Resolve data, models, reference mode and the DeepSpeed config; every check that can fail
    before training fails here (the stage calls it before launching any process)."""
    from pipeline.config import stage_config

    score = store.require("score")
    policy_dir, reference_dir, score_ref = model_dirs(cfg, store)
    data = load_pairs(
        store.stage_dir("score") / "pairs.parquet",
        max_length=cfg.model.max_length,
        max_prompt_length=cfg.model.max_prompt_length,
    )
    objective = build_objective(cfg.train)
    mode = choose_reference(objective, cfg.train, data, reference_dir == score_ref)
    needs_weights = bool(objective.requires & {"chosen_weights", "rejected_weights"})
    if needs_weights and not data.has_weights:
        raise DataError(
            f"{data.source}: objective {cfg.train.objective!r} needs token weights "
            "(chosen_weights / rejected_weights); run `make score` with this objective"
        )
    # config.json read directly: importing transformers here would slow every launch.
    model_config = json.loads((policy_dir / "config.json").read_text())
    text_config = model_config.get("text_config") or {}
    vocab_size = model_config.get("vocab_size") or text_config.get("vocab_size")
    if vocab_size:
        check_vocabulary(data, int(vocab_size))
    ds = deepspeed_config(
        cfg.train.ds_config,
        cfg.train,
        world_size,
        model_config.get("hidden_size") or text_config.get("hidden_size"),
    )
    key = {
        "train": stage_config(cfg, "train"),
        "score": score["output_hash"],
        "world_size": world_size,
        "policy": str(policy_dir),
        "reference": str(reference_dir),
    }
    return TrainPlan(
        train=cfg.train,
        data=data,
        policy_dir=policy_dir,
        reference_dir=reference_dir,
        reference_mode=mode,
        ds_config=ds,
        checkpoint_dir=checkpoint_dir(store.scratch_dir("train"), key),
        output_dir=output_dir,
        world_size=world_size,
        max_length=cfg.model.max_length,
        objective=objective,
        log=log,
    )
