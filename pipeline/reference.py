"""Per-token log-probs of responses under a fixed model (reference precompute, implicit rewards).

A sequence is (prompt token ids, response token ids); the result is one log-prob per response
token, log p(y_t | x, y_<t). Two engines compute it:

- ``TransformersLogprobs``: a forward of the model's decoder on right-padded batches, then the LM
  head on response positions only (``pipeline.objectives.response_token_stats``, the same
  computation training uses), in the configured dtype (float32 by default).
- ``VLLMLogprobs``: vLLM ``prompt_logprobs`` on prompt + response (the response scored as part of
  the prompt; one generated token is discarded).

Text responses (offline and replayed pairs) are tokenised by ``tokenize_response``: the prompt is
tokenised once and each response is appended, checking that prompt + response tokenises with the
prompt's own tokens as prefix (chat-template / BPE boundary merges would otherwise shift tokens
between prompt and response).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from pipeline.console import progress
from pipeline.generation import resolve_device
from pipeline.models import load_causal_lm

TokenSequence = tuple[list[int], list[int]]  # (prompt ids, response ids)


class LogprobEngine(Protocol):
    def __call__(
        self, sequences: Sequence[TokenSequence], desc: str = ...
    ) -> list[list[float]]: ...


def tokenize_response(
    tokenizer: Any, prompt_ids: list[int], prompt_text: str, response: str, eos_id: int | None
) -> tuple[list[int], bool]:
    """Response token ids to append to ``prompt_ids`` (EOS appended), and whether the joint
    tokenisation of prompt_text + response kept the prompt tokens as its prefix.

    When it did, the response ids are the joint tokenisation's remainder (exactly what a model
    sees reading the whole text); when it did not, the response is tokenised on its own, so the
    prompt part stays exactly ``prompt_ids`` either way.
    """
    joint = tokenizer(prompt_text + response, add_special_tokens=False)["input_ids"]
    kept = joint[: len(prompt_ids)] == list(prompt_ids)
    if kept:
        ids = list(joint[len(prompt_ids) :])
    else:
        ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if eos_id is not None:
        ids.append(int(eos_id))
    return ids, kept


class TransformersLogprobs:
    """Response-token log-probs from a transformers model, batched by length."""

    def __init__(
        self,
        model_dir: Path | str,
        dtype: str = "float32",
        device: str = "auto",
        batch_size: int = 16,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
        token_chunk_size: int = 1024,
    ) -> None:
        self.device = resolve_device(device)
        self.model = (
            load_causal_lm(
                model_dir,
                dtype=dtype,
                trust_remote_code=trust_remote_code,
                allow_pickle=allow_pickle,
            )
            .to(self.device)
            .eval()
        )
        self.batch_size = batch_size
        self.token_chunk_size = token_chunk_size

    def __call__(
        self, sequences: Sequence[TokenSequence], desc: str = "log-probs"
    ) -> list[list[float]]:
        import torch

        from pipeline.objectives import response_token_stats

        decoder = self.model.get_decoder()
        head = self.model.get_output_embeddings()
        # Longest first: batches of similar lengths waste little padding.
        order = sorted(
            range(len(sequences)), key=lambda i: -(len(sequences[i][0]) + len(sequences[i][1]))
        )
        out: list[list[float]] = [[] for _ in sequences]
        total = sum(len(p) + len(r) for p, r in sequences)
        bar = progress(total=total, unit="tok", unit_scale=True, desc=desc)
        for b in range(0, len(order), self.batch_size):
            idx = order[b : b + self.batch_size]
            lengths = [len(sequences[i][0]) + len(sequences[i][1]) for i in idx]
            width = max(lengths)
            ids = torch.zeros((len(idx), width), dtype=torch.long)
            attention = torch.zeros((len(idx), width), dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.bool)
            for row, i in enumerate(idx):
                prompt, response = sequences[i]
                if not prompt:
                    raise ValueError(
                        "a sequence has an empty prompt: nothing predicts its first token"
                    )
                full = list(prompt) + list(response)
                ids[row, : len(full)] = torch.tensor(full)
                attention[row, : len(full)] = 1
                mask[row, len(prompt) : len(full)] = True
            ids, attention, mask = (
                ids.to(self.device),
                attention.to(self.device),
                mask.to(self.device),
            )
            with torch.inference_mode():
                hidden = decoder(input_ids=ids, attention_mask=attention).last_hidden_state
                stats = response_token_stats(
                    hidden, ids, mask, head, kl=False, chunk_size=self.token_chunk_size
                )
            logps = stats.logps.float().cpu()
            for row, i in enumerate(idx):
                p, r = len(sequences[i][0]), len(sequences[i][1])
                out[i] = [float(x) for x in logps[row, p : p + r]]
            bar.update(sum(lengths))
        bar.close()
        return out


class VLLMLogprobs:
    """Response-token log-probs through vLLM ``prompt_logprobs`` (one request per sequence)."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    def __call__(
        self, sequences: Sequence[TokenSequence], desc: str = "log-probs"
    ) -> list[list[float]]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        requests = [{"prompt_token_ids": list(p) + list(r)} for p, r in sequences]
        outputs = self.llm.generate(requests, params, use_tqdm=True)
        result = []
        for (prompt, response), out in zip(sequences, outputs, strict=True):
            positions = out.prompt_logprobs[len(prompt) :]
            result.append(
                [float(step[tok].logprob) for step, tok in zip(positions, response, strict=True)]
            )
        return result
