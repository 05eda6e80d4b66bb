"""The rows stages hand each other: a sample (generate -> score, evaluate) and a pair
(score -> train, evaluate). One name per quantity from the parquet column to the loss: a pair's
``ref_chosen_logps`` is the same name in pairs.parquet, in ``training.PairData`` and in the
objectives' ``PairBatch``.

Each row type has one builder (its dataclass) and one column list; writers call ``as_row()``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class SampleRecord:
    """One prompt with its K sampled responses (generate's samples.parquet, evaluate's samples)."""

    prompt_id: str
    prompt: Any  # the dataset's prompt: text or chat messages
    prompt_text: str  # the prompt as the model saw it (chat template applied, maybe truncated)
    prompt_token_ids: list[int]
    responses: list[str]
    response_token_ids: list[list[int]]
    finish_reasons: list[str]  # "stop" or "length" (cut at generate.max_tokens)
    sampling_logprobs: list[list[float]]  # per-token log-probs under the sampler's settings

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PairRecord:
    """One preference pair (score's pairs.parquet). Token-level extras align with the response
    tokens; an empty list means "not computed" (all-or-nothing per file)."""

    prompt_id: str
    prompt: Any
    prompt_text: str
    prompt_token_ids: list[int]
    chosen: str
    rejected: str
    chosen_token_ids: list[int]
    rejected_token_ids: list[int]
    chosen_reward: float = math.nan  # the scorer's reward (a dataset rating for offline pairs)
    rejected_reward: float = math.nan
    source: str = "generated"  # "generated", "offline", "replay", "human"
    ref_chosen_logps: list[float] = field(default_factory=list)  # per token, reference model
    ref_rejected_logps: list[float] = field(default_factory=list)
    chosen_weights: list[float] = field(default_factory=list)  # per token, TIS-DPO
    rejected_weights: list[float] = field(default_factory=list)

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


SAMPLE_COLUMNS = tuple(f.name for f in fields(SampleRecord))
PAIR_COLUMNS = tuple(f.name for f in fields(PairRecord))
# What training cannot do without; the rest of a pair row is optional to it.
PAIR_TOKEN_COLUMNS = ("prompt_token_ids", "chosen_token_ids", "rejected_token_ids")
SIDES = ("chosen", "rejected")
# Per-side columns by quantity: TOKEN_IDS["chosen"] == "chosen_token_ids" (no name templates).
TEXT = {"chosen": "chosen", "rejected": "rejected"}
TOKEN_IDS = {"chosen": "chosen_token_ids", "rejected": "rejected_token_ids"}
REWARD = {"chosen": "chosen_reward", "rejected": "rejected_reward"}
REF_LOGPS = {"chosen": "ref_chosen_logps", "rejected": "ref_rejected_logps"}
WEIGHTS = {"chosen": "chosen_weights", "rejected": "rejected_weights"}
assert all(
    c in PAIR_COLUMNS for m in (TEXT, TOKEN_IDS, REWARD, REF_LOGPS, WEIGHTS) for c in m.values()
)
