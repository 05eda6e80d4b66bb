"""Reference log-prob precompute: equal to a plain transformers fp32 forward, batching-invariant;
prompt + response tokenisation keeps the prompt's tokens. (vLLM's prompt_logprobs path is checked
against the same forward in test_generate.py, inside its one vLLM run.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import RunConfig
from pipeline.models import load_causal_lm, load_tokenizer, render_prompt
from pipeline.reference import TransformersLogprobs, tokenize_response
from pipeline.runstore import RunStore


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_prepared: RunConfig) -> Path:
    return Path(RunStore(tiny_prepared).require("prepare")["model_dir"])


def random_sequences(vocab: int, count: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    gen = torch.Generator().manual_seed(seed)

    def ids(low: int, high: int) -> list[int]:
        n = int(torch.randint(low, high, (1,), generator=gen))
        return torch.randint(3, vocab, (n,), generator=gen).tolist()

    return [(ids(1, 30), ids(1, 20)) for _ in range(count)]


def naive_logps(model: torch.nn.Module, prompt: list[int], response: list[int]) -> list[float]:
    """log p(y_t | x, y_<t) from the full-vocabulary logits of one unpadded fp32 forward."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].float()
    logps = torch.log_softmax(logits, dim=-1)
    return [logps[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(response)]


def test_precompute_equals_transformers_fp32_forward(tiny_model_dir: Path) -> None:
    model = load_causal_lm(tiny_model_dir, dtype="float32").eval()
    seqs = random_sequences(model.config.vocab_size, 9)
    got = TransformersLogprobs(tiny_model_dir, dtype="float32", batch_size=4)(seqs)
    for (prompt, response), values in zip(seqs, got, strict=True):
        assert len(values) == len(response)
        assert values == pytest.approx(naive_logps(model, prompt, response), abs=1e-3)
    # Padding and batch composition change nothing beyond float noise.
    alone = TransformersLogprobs(tiny_model_dir, batch_size=1)(seqs)
    worst = max(
        abs(a - b) for x, y in zip(got, alone, strict=True) for a, b in zip(x, y, strict=True)
    )
    assert worst < 1e-5


def test_empty_prompt_is_refused(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="empty prompt"):
        TransformersLogprobs(tiny_model_dir)([([], [5, 6])])


def test_tokenisation_keeps_the_prompt_prefix(tiny_model_dir: Path) -> None:
    tok = load_tokenizer(tiny_model_dir)
    eos = tok.eos_token_id
    # A chat-rendered prompt ends with the generation prompt: the joint text splits cleanly.
    prompt_text = render_prompt(tok, "Continue this movie review: The film")
    prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    ids, kept = tokenize_response(tok, prompt_ids, prompt_text, "was a great ride.", eos)
    assert kept
    assert prompt_ids + ids == tok(prompt_text + "was a great ride.", add_special_tokens=False)[
        "input_ids"
    ] + [eos]
    # A raw prompt cut mid-word merges with the response when tokenised together: the response
    # is then tokenised on its own, so the prompt part stays exactly the prompt's tokens.
    raw = "The movie was gre"
    raw_ids = tok(raw, add_special_tokens=False)["input_ids"]
    joint = tok(raw + "at fun", add_special_tokens=False)["input_ids"]
    assert joint[: len(raw_ids)] != raw_ids  # the case is real for this tokenizer
    ids, kept = tokenize_response(tok, raw_ids, raw, "at fun", eos)
    assert not kept
    assert ids == tok("at fun", add_special_tokens=False)["input_ids"] + [eos]
