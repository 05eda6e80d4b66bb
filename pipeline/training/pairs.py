"""The training data: the score stage's pairs, checked row by row and truncated to the model.

Truncation keeps the prompt's end and the responses' start, and is counted. Column names come
from ``pipeline.records``: a quantity keeps one name from pairs.parquet to the loss
(``ref_chosen_logps`` is the parquet column, the ``PairData`` field and the ``PairBatch`` field).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import config_hash
from pipeline.data import DataError
from pipeline.records import PAIR_TOKEN_COLUMNS, REF_LOGPS, SIDES, TOKEN_IDS, WEIGHTS
from pipeline.runstore import StageError

# The prompt's token column: the one token column that is not per side.
PROMPT_TOKEN_IDS = PAIR_TOKEN_COLUMNS[0]
assert PROMPT_TOKEN_IDS not in TOKEN_IDS.values()


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
    ref_chosen_logps: list[list[float]] | None = None
    ref_rejected_logps: list[list[float]] | None = None
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
        return self.ref_chosen_logps is not None

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


# -- row validators ------------------------------------------------------------------------------


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


Validator = Callable[[Any, int, str, str], list[float]]
SidePair = tuple[list[float], list[float]]


def _per_token(
    row: dict[str, Any],
    columns: dict[str, str],
    check: Validator,
    full: dict[str, list[int]],
    kept: dict[str, list[int]],
    where: str,
) -> SidePair | None:
    """A per-token extra of both responses (``columns``: side -> column), or None if a side
    lacks it. Validated against the full responses, then cut like them."""
    values = {side: row.get(columns[side]) or [] for side in SIDES}
    if not all(values.values()):
        return None
    chosen, rejected = (
        check(values[side], len(full[side]), where, columns[side])[: len(kept[side])]
        for side in SIDES
    )
    return chosen, rejected


# -- loading -------------------------------------------------------------------------------------


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
    missing = [c for c in PAIR_TOKEN_COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (score stage schema)")
    rows = table.to_pylist()
    report = TruncationReport(pairs=len(rows))
    data = PairData([], [], [], [], source=str(path))
    ref_rows: list[SidePair] = []
    weight_rows: list[SidePair] = []
    with_ref = with_weights = True
    for i, row in enumerate(rows):
        where = f"{path}: row {i}"
        prompt = _token_list(row[PROMPT_TOKEN_IDS], where, PROMPT_TOKEN_IDS)
        full = {side: _token_list(row[TOKEN_IDS[side]], where, TOKEN_IDS[side]) for side in SIDES}
        if not prompt:
            raise DataError(f"{where}: field '{PROMPT_TOKEN_IDS}' is empty")
        if not full["chosen"] or not full["rejected"]:
            report.dropped_empty_response += 1
            continue
        prompt, chosen, rejected, p_cut, r_cut = truncate_pair(
            prompt, full["chosen"], full["rejected"], max_length, max_prompt_length
        )
        report.prompt_truncated += p_cut
        report.response_truncated += r_cut
        kept = {"chosen": chosen, "rejected": rejected}
        ref = _per_token(row, REF_LOGPS, _log_probs, full, kept, where)
        with_ref = with_ref and ref is not None
        if ref is not None:
            ref_rows.append(ref)
        weights = _per_token(row, WEIGHTS, _float_list, full, kept, where)
        with_weights = with_weights and weights is not None
        if weights is not None:
            weight_rows.append(weights)
        pid = row.get("prompt_id")
        data.pair_ids.append(f"{pid}#{i}" if pid is not None else f"row{i}")
        data.prompts.append(prompt)
        data.chosen.append(chosen)
        data.rejected.append(rejected)
    if with_ref and ref_rows and len(ref_rows) == len(data):
        data.ref_chosen_logps = [c for c, _ in ref_rows]
        data.ref_rejected_logps = [r for _, r in ref_rows]
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
    """Every token id must exist in the model (pairs from another tokenizer fail here)."""
    for i, seqs in enumerate(zip(data.prompts, data.chosen, data.rejected, strict=True)):
        top = max(max(s) for s in seqs)
        if top >= vocab_size:
            raise DataError(
                f"{data.source}: pair {data.pair_ids[i]} has token id {top} >= the "
                f"model's vocabulary size {vocab_size}: pairs from another tokenizer?"
            )
