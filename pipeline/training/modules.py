"""What the engines wrap: the policy (LM + objective), the frozen reference, the prompt-free model.

Chosen and rejected go through the model in one forward, in the micro-batch's layout (padded
rows; each pair's prompt once followed by both responses, a 4D mask keeping the responses apart;
or every sequence packed into one row without padding), unpacked to the usual [2B, T] layout
(``decoder_outputs``). Per-token log-probs and KL come from the objectives library's
chunked statistics with the LM head *module* (ZeRO-3 gathers its weight). The objective (with any
learnable prior parameters) lives inside the policy module, so its parameters train with it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.objectives import MIDPOObjective, PairBatch, response_token_stats
from pipeline.objectives.batch import SIDE_FIELDS
from pipeline.training.batching import MicroBatch, shared_prompt_mask

# -- the model's pieces --------------------------------------------------------------------------


def decoder(lm: Any) -> nn.Module:
    """The transformer body of a Hugging Face causal LM (final hidden states, no head)."""
    body: nn.Module = getattr(lm, lm.base_model_prefix)
    return body


def layer_classes(lm: nn.Module) -> list[type[nn.Module]]:
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


def _shift_right(hidden: Tensor) -> Tensor:
    """Position t gets the state that predicts token t (the state at t - 1)."""
    return torch.cat([torch.zeros_like(hidden[:, :1]), hidden[:, :-1]], dim=1)


# -- forward passes ------------------------------------------------------------------------------


def decoder_outputs(lm: Any, batch: MicroBatch, hidden_states: bool = False) -> Any:
    """The decoder's outputs in the usual [2B, T, ...] layout, from the shared-prompt or packed
    layout when the batch has one (``last_hidden_state``, and ``hidden_states`` when asked)."""
    body = decoder(lm)
    if batch.packed_ids is None:
        return body(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            output_hidden_states=hidden_states,
        )
    assert batch.unpack_index is not None
    segments = batch.packed_segments
    dtype = lm.get_input_embeddings().weight.dtype
    out = body(
        input_ids=batch.packed_ids,
        # padding-free rows need none: the model reads the sequences from the position ids
        attention_mask=shared_prompt_mask(segments, dtype) if segments is not None else None,
        position_ids=batch.packed_positions,
        output_hidden_states=hidden_states,
        use_cache=False,  # with a cache the model would not look for packed sequences
    )
    rows = batch.unpack_rows
    if rows is None:  # shared prompt: pair b's row holds sequences b and B + b
        pairs = batch.packed_ids.shape[0]
        rows = (torch.arange(2 * pairs, device=batch.packed_ids.device) % pairs)[:, None]

    def unpack(t: Tensor) -> Tensor:
        return t[rows, batch.unpack_index]

    out.last_hidden_state = unpack(out.last_hidden_state)
    if hidden_states and out.hidden_states is not None:
        out.hidden_states = tuple(unpack(h) for h in out.hidden_states)
    return out


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


# -- the engines' modules -------------------------------------------------------------------------


class PromptFreeModule(nn.Module):
    """Per-token log-probs of responses scored without their prompt: log p(y_t | y_<t).

    The first response token has nothing before it and is not scored. This is the marginal
    prior's model (trained by maximum likelihood) and RMiPO's prompt-free policy pass.
    """

    def __init__(self, lm: Any, chunk_size: int, recompute_logits: bool = True) -> None:
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size
        self.recompute_logits = recompute_logits

    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        return prompt_free_logps(
            self.lm, MicroBatch(**batch), self.chunk_size, self.recompute_logits
        )


def prompt_free_logps(
    lm: Any, batch: MicroBatch, chunk_size: int, recompute_logits: bool = True
) -> tuple[Tensor, Tensor]:
    """(logps [2B, Tr], scored mask [2B, Tr]) of each response alone."""
    assert batch.free_ids is not None and batch.free_attention_mask is not None
    hidden = decoder(lm)(
        input_ids=batch.free_ids, attention_mask=batch.free_attention_mask
    ).last_hidden_state
    mask = batch.free_attention_mask.bool().clone()
    mask[:, 0] = False
    stats = response_token_stats(
        hidden,
        batch.free_ids,
        mask,
        lm.get_output_embeddings(),
        chunk_size=chunk_size,
        recompute=recompute_logits,
    )
    return stats.logps, mask


def response_logps(lm: Any, batch: MicroBatch, chunk_size: int) -> Tensor:
    """Per-token log-probs [2B, T] of the batch's responses (0 elsewhere), in its layout."""
    hidden = decoder_outputs(lm, batch).last_hidden_state
    head = lm.get_output_embeddings()
    stats = response_token_stats(
        hidden, batch.input_ids, batch.response_mask, head, chunk_size=chunk_size
    )
    return stats.logps


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
        names = [f.name for f in dataclasses.fields(PairBatch)]
        out = self.objective(PairBatch(**dict(zip(names, values, strict=True))))  # type: ignore[arg-type]
        self.metrics = out.metrics
        return out.loss, out.losses

    def call(self, batch_fields: dict[str, Tensor]) -> dict[str, Any]:
        """Run on named PairBatch fields; {"loss", "losses", "metrics"}."""
        loss, losses = self(*(batch_fields.get(f.name) for f in dataclasses.fields(PairBatch)))
        return {"loss": loss, "losses": losses, "metrics": self.metrics}


class PolicyModule(nn.Module):
    """What the policy engine wraps: the causal LM and the objective (its prior parameters).

    ``forward`` returns {"loss", "losses" [B], "metrics"} for one micro-batch (a dict of fields
    of ``MicroBatch``); ``mode="logps"`` returns the per-token log-probs only.
    ``recompute_logits``: the LM head's chunks recompute their logits in backward (less memory)
    or keep them (one head pass less; ``train.recompute_logits``).
    """

    def __init__(
        self,
        lm: Any,
        objective: MIDPOObjective,
        chunk_size: int,
        recompute_logits: bool = True,
    ) -> None:
        super().__init__()
        self.lm = lm
        self.objective_call = ObjectiveCall(objective)
        self.chunk_size = chunk_size
        self.recompute_logits = recompute_logits

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
        batch = MicroBatch(**fields)
        obj = self.objective
        hidden = decoder_outputs(self.lm, batch).last_hidden_state
        for_loss = mode == "loss"
        # Optional fields (RMiPO's chosen_marginal_mask) are passed whenever the objective reads them.
        reads: frozenset[str] = obj.accepts if for_loss else frozenset()
        requires: frozenset[str] = obj.requires if for_loss else frozenset()
        kl, reverse_kl = (SIDE_FIELDS[generic][0] in requires for generic in ("kl", "reverse_kl"))
        ref_hidden = ref.get("hidden") if ((kl or reverse_kl) and ref is not None) else None
        stats = response_token_stats(
            hidden,
            batch.input_ids,
            batch.response_mask,
            self.lm.get_output_embeddings(),
            ref_hidden=ref_hidden,
            ref_lm_head=ref_head if ref_hidden is not None else None,
            kl=kl,
            reverse_kl=reverse_kl,
            chunk_size=self.chunk_size,
            recompute=self.recompute_logits,
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
