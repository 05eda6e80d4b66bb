"""The training loop of one rank: micro-batches through the engines, one optimizer step at a time.

Every loss is a mean over the real pairs of the optimizer step (so batch 1 x accumulation 4 equals
4 x 1); metrics are means over the global batch (``global_means``: one all-reduce a step). A
non-finite loss stops every rank before the step is applied (``non_finite_error``). Random draws
in a step (dropout, e.g. SparsePO's mask heads) come from (train.seed, step, rank) alone
(``step_seed``), so a resumed run draws what the uninterrupted one did. The engines, the
checkpoints and the export are their own pieces (``engines``, ``checkpoints``, ``export``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline import distributed
from pipeline.console import progress
from pipeline.training.batching import (
    SHARED_PROMPT_TOLERANCE,
    MicroBatch,
    collate,
    split_global_batch,
)
from pipeline.training.checkpoints import Checkpoints, read_latest, truncate_metrics
from pipeline.training.engines import Engines, build_engines
from pipeline.training.errors import TrainingError
from pipeline.training.export import export
from pipeline.training.plan import TrainPlan, TrainResult

PROBE_PAIRS = 4  # pairs whose log-probs the export check compares


class Trainer:
    """One rank's training run. Every rank builds one; rank 0 also logs and exports."""

    def __init__(self, plan: TrainPlan, ranks: distributed.Ranks) -> None:
        self.plan = plan
        self.ranks = ranks
        self.objective = plan.objective
        self.device = distributed.current_device()
        self.lengths = plan.data.lengths
        self.checkpoints = Checkpoints(plan, ranks)
        self._engines: Engines | None = None
        self._order: tuple[int, list[list[int]]] | None = None  # (epoch, its global batches)

    @property
    def engines(self) -> Engines:
        if self._engines is None:
            raise RuntimeError("Trainer.build() must run before training")
        return self._engines

    def build(self) -> None:
        if self.plan.launch.layout == "shared_prompt":
            self.check_shared_prompt()  # before the engines: ZeRO-3 would partition its model
        self._engines = build_engines(self.plan)

    def partition(self) -> dict[str, Any]:
        return {**self.engines.partition(), "rank": self.ranks.rank}

    def close(self) -> None:
        """Drop the engines (several trainers may run one after another in a process)."""
        import gc

        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # also after a failed build
        self._engines = None
        gc.collect()

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        plan, main = self.plan, self.ranks.is_main
        total = plan.total_steps
        start = self.checkpoints.resume(self.engines)
        metrics_path = plan.checkpoint_dir / "metrics.jsonl"
        if main:
            plan.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            truncate_metrics(metrics_path, start)
        bar = _progress_bar(total, start, enabled=main)
        last_loss = float("nan")
        started = time.time()
        tokens_total = 0
        history: list[dict[str, float]] = []
        self.engines.policy.train()
        for step in range(start, total):
            metrics = self.step(step)
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
                    refresh=False,  # update() redraws, at most every TQDM_MININTERVAL
                )
                bar.update(1)
            every = plan.train.checkpoint_every
            if plan.checkpoints and ((step + 1) % every == 0 or step + 1 == total):
                self.checkpoints.save(step + 1, self.engines)
        bar.close()
        if not history and main and metrics_path.is_file():  # resumed after the last step
            lines = metrics_path.read_text().splitlines()
            last_loss = json.loads(lines[-1])["loss"] if lines else last_loss
        seconds = time.time() - started
        export_check = export(plan, self.engines, self._probe(), main) if plan.export else {}
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

    def step(self, step: int) -> dict[str, float]:
        """Optimizer step ``step`` (0-based) on every rank; its metrics (global means)."""
        plan, t, engines = self.plan, self.plan.train, self.engines
        epoch, index = divmod(step, plan.steps_per_epoch)
        global_batch = self._epoch_order(epoch)[index]
        accum, world = t.gradient_accumulation_steps, self.ranks.world_size
        micro = split_global_batch(global_batch, self.lengths, world, accum, self.ranks.rank)
        torch.manual_seed(step_seed(t.seed, step, self.ranks.rank))
        t0 = time.time()
        lrs = engines.learning_rates()  # the rates this step uses
        sums, tokens = self._policy_step(step, micro, global_batch)
        if engines.marginal is not None and (step + 1) % t.marginal_prior_every == 0:
            sums["marginal/nll"] = self._marginal_step(micro, global_batch)
        metrics, tokens_global = global_means(sums, tokens, len(global_batch), self.device)
        metrics |= engines.step_figures(lrs)
        metrics |= {
            "tokens": tokens_global,
            "epoch": float(epoch),
            "pairs": float(len(global_batch)),
        }
        step_time = time.time() - t0  # the whole step: forward, backward, update, metrics
        metrics["step_time_s"] = step_time
        metrics["tokens_per_s"] = metrics["tokens"] / step_time if step_time > 0 else 0.0
        return metrics

    def _epoch_order(self, epoch: int) -> list[list[int]]:
        """The epoch's global batches (computed once per epoch)."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, self.plan.epoch_order(epoch, self.lengths))
        return self._order[1]

    # -- one optimizer step ----------------------------------------------------------------------
    def _policy_step(
        self, step: int, micro: list[list[int]], global_batch: list[int]
    ) -> tuple[dict[str, float], int]:
        """Forward/backward every micro-batch, then the optimizer step. Returns summed metrics."""
        engines = self.engines
        world, accum = self.ranks.world_size, self.plan.train.gradient_accumulation_steps
        scale = world * accum / len(global_batch)  # makes the loss a mean over the global batch
        sums: dict[str, float] = {}
        tokens = 0
        finite: list[tuple[MicroBatch, Tensor, Tensor]] = []  # (batch, losses, loss finite?)
        for m, indices in enumerate(micro):
            batch = self._micro_batch(indices, filler=global_batch[0])
            ref = engines.reference_outputs(batch)
            marginal = engines.marginal_logps(batch)
            out = engines.policy(
                batch.as_dict(), ref=ref, ref_head=engines.reference_head, marginal=marginal
            )
            losses = out["losses"]
            extra = out["loss"] - losses.mean()  # terms beyond the pair losses (SimPO's SFT)
            loss = scale * (
                (losses * batch.row_weight.to(losses.dtype)).sum() + batch.num_real * extra
            )
            # Read once a step, before the update (DeepSpeed applies it at the last
            # micro-batch's step()): one device read and one all-reduce, not one per micro-batch.
            finite.append((batch, losses.detach(), torch.isfinite(loss.detach())))
            if m == len(micro) - 1:
                flags = torch.stack([ok for _, _, ok in finite]).tolist()
                if not distributed.all_true(all(flags)):
                    first = flags.index(False) if False in flags else None
                    bad = None if first is None else (first, *finite[first][:2])
                    raise non_finite_error(step, bad, self.plan)
            engines.policy.backward(loss)
            if m == len(micro) - 1:
                engines.note_grad_norm()
            engines.policy.step()
            for key, value in out["metrics"].items():
                sums[key] = sums.get(key, 0.0) + value * batch.num_real
            tokens += batch.num_tokens
        return sums, tokens

    def _marginal_step(self, micro: list[list[int]], global_batch: list[int]) -> float:
        """One maximum-likelihood step of the marginal prior on this step's responses."""
        from pipeline.objectives import marginal_prior_nll

        marginal = self.engines.marginal
        assert marginal is not None
        world, accum = self.ranks.world_size, self.plan.train.gradient_accumulation_steps
        scale = world * accum / len(global_batch)
        total = 0.0
        marginal.train()
        for indices in micro:
            batch = self._micro_batch(indices, filler=global_batch[0])
            logps, mask = marginal(batch.as_dict())
            nll = marginal_prior_nll(logps, mask)
            marginal.backward(nll * batch.num_real * scale)
            marginal.step()
            total += float(nll.detach()) * batch.num_real
        return total

    # -- micro-batches -------------------------------------------------------------------------
    def _micro_batch(self, indices: list[int], filler: int) -> MicroBatch:
        plan, objective = self.plan, self.objective
        batch = collate(
            plan.data,
            indices,
            filler,
            self.engines.pad_id,
            ref_logps=plan.reference_mode == "precomputed",
            weights=plan.data.has_weights and objective.needs_token_weights,
            prompt_free=objective.marginal_source is not None,
            layout=plan.launch.layout,
        )
        return batch.to(self.device)

    def _probe(self) -> MicroBatch:
        """The first pairs as separate sequences (the export check's yardstick)."""
        indices = list(range(min(PROBE_PAIRS, len(self.plan.data))))
        return separate(self._micro_batch(indices, filler=0))

    def check_shared_prompt(self) -> None:
        """The shared-prompt forward must give the two-sequence forward's log-probs.

        A model whose attention ignores custom 4D masks (e.g. flash-attention-2) would let the
        rejected response see the chosen one; this catches it before any step. Compared in
        float32 on a copy of the policy (the attention path is the model's, not its dtype's):
        valid data agrees to rounding (~1e-6 nats), a mask that is ignored misses by ~1.
        """
        from pipeline.models import load_tokenizer
        from pipeline.training.engines import load_lm
        from pipeline.training.modules import response_logps

        plan = self.plan
        tokenizer = load_tokenizer(plan.policy_dir)
        pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        lm = load_lm(plan.policy_dir, torch.float32, False, False, plan.launch.attention)
        lm.to(self.device)
        indices = list(range(min(2, len(plan.data))))
        batch = collate(plan.data, indices, 0, pad_id, layout="shared_prompt").to(self.device)
        with torch.no_grad():
            shared = response_logps(lm, batch, plan.train.token_chunk_size)
            apart = response_logps(lm, separate(batch), plan.train.token_chunk_size)
        del lm
        mask = batch.response_mask
        diff = float(((shared - apart).abs() * mask).sum() / mask.sum())
        limit = SHARED_PROMPT_TOLERANCE["fp32"]
        if diff > limit:
            raise TrainingError(
                f"train.layout=shared_prompt: with attention {plan.launch.attention!r} the "
                f"shared-prompt forward differs from two separate sequences by {diff:.3g} nats "
                f"per token in float32 (limit {limit}); this attention "
                "ignores custom 4D masks. Set train.attention=sdpa or train.layout=padded"
            )


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of optimizer step ``step`` on ``rank``: well mixed, and the same in an
    uninterrupted run and in one resumed before that step."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0] >> 1)


def separate(batch: MicroBatch) -> MicroBatch:
    """The same micro-batch as separate padded sequences (no shared-prompt or packed rows)."""
    return dataclasses.replace(
        batch, packed_ids=None, packed_segments=None, unpack_index=None, unpack_rows=None
    )


def _progress_bar(total: int, start: int, enabled: bool) -> Any:
    return progress(
        total=total, initial=start, unit="step", desc="train", disable=not enabled,
        dynamic_ncols=True,
    )  # fmt: skip


# -- metric reduction and the NaN guard ------------------------------------------------------------


def global_means(
    sums: dict[str, float], tokens: int, n_global: int, device: Any
) -> tuple[dict[str, float], float]:
    """Per-rank metric sums -> means over the global batch, and the global token count.

    One all-reduce. Sums of (batch mean x real pairs) over micro-batches and ranks / pairs =
    global means; values that are the same everywhere (learnable prior parameters) come out
    unchanged.
    """
    import torch.distributed as dist

    keys = sorted(sums)
    values = torch.tensor(
        [sums[k] for k in keys] + [float(tokens)], dtype=torch.float64, device=device
    )
    if dist.is_initialized():
        dist.all_reduce(values)
    totals = values.tolist()
    means = {k: v / n_global for k, v in zip(keys, totals[:-1], strict=True)}
    return means, totals[-1]


def non_finite_error(
    step: int, bad: tuple[int, MicroBatch, Tensor] | None, plan: TrainPlan
) -> TrainingError:
    """What stops training at a non-finite loss: the pairs (from every rank) and the last good
    checkpoint. Every rank calls it together (it gathers); ``bad``: this rank's first
    non-finite micro-batch (index, batch, per-pair losses), None where all were finite."""
    pairs: list[str] = []
    micro_steps: list[int] = []
    if bad is not None:
        micro_step, batch, losses = bad
        micro_steps.append(micro_step)
        pairs = [
            pid
            for pid, value in zip(batch.pair_ids, losses.tolist(), strict=False)
            if not math.isfinite(value)
        ]
    gathered = distributed.gather_objects((pairs, micro_steps))
    everywhere = sorted({p for part, _ in gathered for p in part})
    micro_step = min((m for _, ms in gathered for m in ms), default=0)
    latest = read_latest(plan.checkpoint_dir)
    kept = f"step {latest['step']} in {plan.checkpoint_dir}" if latest else "none yet"
    return TrainingError(
        f"non-finite loss at optimizer step {step + 1}, micro-batch {micro_step + 1} "
        f"(pairs {', '.join(everywhere) or 'unknown'}); stopped before applying it. Last good "
        f"checkpoint: {kept}. Lower train.learning_rate or fix those pairs, then rerun to "
        "resume"
    )
