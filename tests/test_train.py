"""train stage: ZeRO-3 over 2 gloo ranks on the tiny preset.

DeepSpeed launches cost 15-40 s each on a 2-core machine, so the launches are shared:
- one 2-rank stage run (`trained`) checked for falling loss, partitioning, MLflow, export reload;
- a run killed mid-epoch, then resumed as 2 nodes x 1 process over loopback: its losses must
  equal the uninterrupted run's (the epoch of 13 pairs is not a multiple of the global batch);
- one torchrun job (this file's ``__main__``) that trains every named objective a few steps,
  bf16, ZeRO-2 and ZeRO-3-offload configs, live vs precomputed reference, gradient-accumulation
  invariance and the NaN stop, and writes what it saw to JSON.
Everything before the launches (bad input, data order, DeepSpeed config) is checked in-process.
"""

from __future__ import annotations

import base64
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline import distributed, training
from pipeline.cli import exit_cleanly
from pipeline.config import ConfigError, RunConfig, build_objective, load_config
from pipeline.data import DataError, read_rows, write_rows
from pipeline.runstore import RunStore, StageError
from tests.conftest import TINY, random_llama, run_stage, torchrun_job

REPO = Path(__file__).resolve().parent.parent
if not shutil.which("nvidia-smi"):  # as the Makefile: DeepSpeed on the CPU without a GPU
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
NUM_PAIRS = 13  # 3 full global batches of 4 and one of 1: every epoch ends unevenly
# 3 epochs x 4 steps; checkpoints at 3, 6, 9, 12 all fall inside an epoch.
TRAIN_ARGS = [
    "train.epochs=3",
    "train.checkpoint_every=3",
    "train.learning_rate=2e-3",
    "train.warmup_ratio=0.0",
]


# -- building a run with pairs -----------------------------------------------------------------


def make_pairs(cfg: RunConfig, n: int = NUM_PAIRS, seed: int = 0) -> list[dict[str, Any]]:
    """A learnable problem: chosen responses use positive words, rejected ones negative words.

    Reference log-probs are computed with the base model in fp32, as the score stage does.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.models import load_tokenizer

    store = RunStore(cfg)
    model_dir = store.require("prepare")["model_dir"]
    tok = load_tokenizer(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = read_rows(store.stage_dir("prepare") / "prompts" / "train.parquet")
    rng = random.Random(seed)
    good = ["great", "wonderful", "excellent", "fun", "moving", "beautiful"]
    bad = ["awful", "terrible", "boring", "dull", "bad", "weak"]

    def ref_logps(prompt: list[int], response: list[int]) -> list[float]:
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logps = torch.log_softmax(lm(ids).logits[0, :-1].float(), -1)
        return logps[len(prompt) - 1 :].gather(-1, ids[0, len(prompt) :, None])[:, 0].tolist()

    rows = []
    for i in range(n):
        p = prompts[i % len(prompts)]
        prompt = tok(p["prompt_text"], add_special_tokens=False)["input_ids"]
        words = [rng.choice(good) for _ in range(1 + i % 4)]
        chosen = tok(" " + " ".join(words), add_special_tokens=False)["input_ids"]
        words = [rng.choice(bad) for _ in range(1 + (i + 2) % 4)]
        rejected = tok(" " + " ".join(words), add_special_tokens=False)["input_ids"]
        chosen, rejected = chosen + [tok.eos_token_id], rejected + [tok.eos_token_id]
        rows.append(
            {
                "prompt_id": p["prompt_id"],
                "prompt": p["prompt"],
                "prompt_text": p["prompt_text"],
                "prompt_token_ids": prompt,
                "chosen": tok.decode(chosen),
                "rejected": tok.decode(rejected),
                "chosen_token_ids": chosen,
                "rejected_token_ids": rejected,
                "chosen_reward": 1.0,
                "rejected_reward": 0.0,
                "ref_chosen_logps": ref_logps(prompt, chosen),
                "ref_rejected_logps": ref_logps(prompt, rejected),
                "chosen_weights": [1.0] * (len(chosen) - 1) + [0.0],
                "rejected_weights": [0.8] * (len(rejected) - 1) + [0.0],
                "source": "generated",
            }
        )
    return rows


def write_score(cfg: RunConfig, rows: list[dict[str, Any]]) -> None:
    """Stand in for the score stage: its pairs.parquet under a complete manifest."""
    with RunStore(cfg).stage("score", force=True) as st:
        write_rows(st.dir / "pairs.parquet", rows)


def new_run(root: Path, cache: Path, name: str, *overrides: str) -> RunConfig:
    cfg = load_config(TINY, [f"root={root}", f"cache_dir={cache}", f"name={name}", *overrides])
    run_stage(cfg, "prepare")
    return cfg


@pytest.fixture(scope="module")
def pairs_root(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Any]:
    """A prepared tiny run root plus the pairs every test trains on."""
    root = tmp_path_factory.mktemp("train") / "runs"
    cfg = new_run(root, cache_dir, "base", *TRAIN_ARGS)
    return {"root": root, "cache": cache_dir, "rows": make_pairs(cfg)}


def run_with_pairs(
    env: dict[str, Any], name: str, *overrides: str, rows: list[dict[str, Any]] | None = None
) -> RunConfig:
    cfg = new_run(env["root"], env["cache"], name, *TRAIN_ARGS, *overrides)
    write_score(cfg, env["rows"] if rows is None else rows)
    return cfg


@pytest.fixture(autouse=True)
def _two_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in (
        "NNODES",
        "NODE_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "HOSTFILE",
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "MIDPO_LAUNCHER",
    ):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NPROC", "2")


def metrics(cfg: RunConfig) -> list[dict[str, float]]:
    path = RunStore(cfg).stage_dir("train") / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def manifest(cfg: RunConfig) -> dict[str, Any]:
    return dict(json.loads((RunStore(cfg).stage_dir("train") / "manifest.json").read_text()))


# -- in-process: data, order, config, bad input -----------------------------------------------


def test_truncation_keeps_prompt_end_and_response_start() -> None:
    prompt, chosen, rejected = list(range(10)), [100, 101, 102, 103], [200, 201]
    p, c, r, p_cut, r_cut = training.truncate_pair(prompt, chosen, rejected, 9, 6)
    assert p == [4, 5, 6, 7, 8, 9] and c == [100, 101, 102] and r == [200, 201]
    assert p_cut and r_cut
    assert training.truncate_pair([1, 2], [3], [4], 9, 6)[3:] == (False, False)


def test_load_pairs_counts_truncation_and_rejects_bad_rows(
    pairs_root: dict[str, Any], tmp_path: Path
) -> None:
    rows = [dict(r) for r in pairs_root["rows"]]
    rows[0]["chosen_token_ids"] = rows[0]["chosen_token_ids"] * 20  # longer than max_length
    rows[0]["ref_chosen_logps"] = rows[0]["ref_chosen_logps"] * 20
    rows[0]["chosen_weights"] = rows[0]["chosen_weights"] * 20
    rows[1]["rejected_token_ids"] = []  # empty response: dropped and counted
    path = tmp_path / "pairs.parquet"
    write_rows(path, rows)
    data = training.load_pairs(path, max_length=64, max_prompt_length=32)
    report = data.report
    assert report.pairs == NUM_PAIRS and report.dropped_empty_response == 1
    assert len(data) == NUM_PAIRS - 1 and report.response_truncated >= 1
    assert all(len(p) <= 32 for p in data.prompts)
    assert max(data.lengths) <= 64
    assert report.prompt_truncated == sum(
        len(r["prompt_token_ids"]) > 32 for r in rows[:1] + rows[2:]
    )
    # reference log-probs are cut with their response
    assert data.ref_chosen_logps is not None
    assert all(len(a) == len(b) for a, b in zip(data.ref_chosen_logps, data.chosen, strict=True))

    rows = [dict(r) for r in pairs_root["rows"]]
    rows[4]["ref_rejected_logps"] = [math.nan] * len(rows[4]["rejected_token_ids"])
    write_rows(path, rows)
    with pytest.raises(
        DataError, match=r"pairs.parquet: row 4: field 'ref_rejected_logps' has NaN"
    ):
        training.load_pairs(path, max_length=64, max_prompt_length=32)
    rows[4] = dict(pairs_root["rows"][4], chosen_token_ids=[3, -1])
    write_rows(path, rows)
    with pytest.raises(DataError, match=r"row 4: field 'chosen_token_ids' has -1"):
        training.load_pairs(path, max_length=64, max_prompt_length=32)


def test_policy_module_feeds_rmipo_the_prompt_free_mask() -> None:
    """RMiPO in training equals a float64 re-computation from the model's own log-probs.

    The prompt-free pass cannot score a response's first token; the PMI mean must leave that
    position out (through chosen/rejected_marginal_mask), not average a zero into it.
    """
    import torch

    from pipeline.objectives import make_objective

    lm = random_llama().eval()
    data = training.PairData(
        pair_ids=["a", "b"],
        prompts=[[1, 2, 3], [4, 5]],
        chosen=[[6, 7, 8, 9], [10, 11, 12]],
        rejected=[[13, 14], [15, 16, 17, 18, 19]],
    )
    batch = training.collate(data, [0, 1], 0, pad_id=0, prompt_free=True)
    module = training.PolicyModule(lm, make_objective("rmipo"), chunk_size=8)
    with torch.no_grad():
        loss = module(batch.as_dict())["loss"]

    def token_logps(ids: list[int]) -> list[float]:
        logits = lm(input_ids=torch.tensor([ids])).logits[0].double()
        logp = logits.log_softmax(-1)
        return [float(logp[t - 1, ids[t]]) for t in range(1, len(ids))]

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    expected = []
    with torch.no_grad():
        for j in range(2):
            p = data.prompts[j]
            mean_l, pmi = {}, {}
            for side in ("chosen", "rejected"):
                y = getattr(data, side)[j]
                conditional = token_logps(p + y)[len(p) - 1 :]  # log pi(y_t | x, y_<t)
                free = token_logps(y)  # log p(y_t | y_<t), t >= 1: the first token is unscored
                mean_l[side] = mean(conditional)
                pmi[side] = mean_l[side] - mean(free)
            gamma = 0.3 + 1.3 * math.exp(-max(pmi["chosen"] - pmi["rejected"], 0.0))
            logit = 2.0 * (mean_l["chosen"] - mean_l["rejected"] - gamma)
            expected.append(math.log1p(math.exp(-logit)))
    assert float(loss) == pytest.approx(sum(expected) / 2, abs=1e-5)


def test_shared_prompt_layout_gives_the_separate_sequences_loss_and_gradients() -> None:
    """Each prompt once, both responses after it (4D mask, shared positions): the per-token
    log-probs, the loss and every gradient equal the two-sequence forward's (fp32)."""
    import torch

    from pipeline.objectives import make_objective

    lm = random_llama()
    data = training.PairData(
        pair_ids=["a", "b", "c"],
        prompts=[[1, 2, 3], [4, 5], [7, 8, 9, 10, 11]],
        chosen=[[6, 7, 8, 9], [10, 11, 12], [3]],
        rejected=[[13, 14], [15, 16, 17, 18, 19], [20, 21, 22]],
    )
    module = training.PolicyModule(lm, make_objective("dpo", beta=0.5), chunk_size=8)
    results = {}
    for share in (False, True):
        batch = training.collate(data, [0, 1, 2], 0, pad_id=0, share_prompt=share)
        assert (batch.packed_ids is not None) == share
        lm.zero_grad()
        with torch.no_grad():
            logps = module(batch.as_dict(), mode="logps")
        fields = batch.as_dict()
        # a reference that differs from the policy, so the loss has a real gradient
        fields["ref_logps"] = (logps - 0.3 * torch.arange(6.0)[:, None]) * batch.response_mask
        loss = module(fields)["loss"]
        loss.backward()
        grads = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
        results[share] = (logps, loss.detach(), grads)
    (sep_logps, sep_loss, sep_grads), (sh_logps, sh_loss, sh_grads) = results[False], results[True]
    assert batch.packed_ids is not None and batch.packed_ids.shape[1] == 2 + 3 + 5  # pair b
    torch.testing.assert_close(sh_logps, sep_logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sh_loss, sep_loss, atol=1e-6, rtol=1e-6)
    assert sep_grads.keys() == sh_grads.keys() and len(sep_grads) > 0
    for name, grad in sep_grads.items():
        torch.testing.assert_close(sh_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_epoch_order_is_deterministic_complete_and_bucketed() -> None:
    lengths = [random.Random(i).randint(5, 60) for i in range(37)]
    batches = training.epoch_batches(lengths, 8, seed=3, epoch=1, bucket_window=4)
    assert batches == training.epoch_batches(lengths, 8, seed=3, epoch=1, bucket_window=4)
    assert batches != training.epoch_batches(lengths, 8, seed=3, epoch=2, bucket_window=4)
    assert sorted(i for b in batches for i in b) == list(range(37))  # nothing dropped
    assert sorted(len(b) for b in batches) == [5, 8, 8, 8, 8]
    # bucketing: less padding than a plain shuffle
    plain = training.epoch_batches(lengths, 8, seed=3, epoch=1, bucket_window=1)

    def padding(bs: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)

    assert padding(batches) < padding(plain)


@pytest.mark.parametrize("size", [8, 5, 1])
def test_global_batch_split_covers_every_pair_once(size: int) -> None:
    lengths = list(range(100, 0, -1))
    batch = list(range(size))
    parts = [training.split_global_batch(batch, lengths, 2, 2, rank) for rank in range(2)]
    assert all(len(p) == 2 for p in parts)  # every rank runs every micro-step
    flat = sorted(i for p in parts for micro in p for i in micro)
    assert flat == batch
    sizes = [len(micro) for p in parts for micro in p]
    assert max(sizes) - min(sizes) <= 1


def test_launcher_exit_code_in_words() -> None:
    """A failed job's exit code names the killing signal, also a real-time one (no enum name)."""
    from pipeline.distributed import exit_reason

    assert exit_reason(1) == "launcher exit code 1"
    assert "SIGKILL (out of memory, or killed)" in exit_reason(137)  # 128 + 9 (a shell)
    assert "SIGKILL" in exit_reason(256 - 9)  # the launcher: the rank's -9
    assert "by SIGTERM;" in exit_reason(128 + signal.SIGTERM)
    rt = signal.SIGRTMIN + 5
    assert f"by signal {rt};" in exit_reason(256 - rt)
    assert f"by signal {rt};" in exit_reason(128 + rt)


def test_deepspeed_config_auto_and_contradictions(tmp_path: Path) -> None:
    cfg = load_config(
        TINY, ["train.per_device_batch_size=2", "train.gradient_accumulation_steps=3"]
    )
    ds = training.deepspeed_config("ds_configs/zero3.json", cfg.train, 2, hidden_size=64)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 12 and ds["bf16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 3
    # Bucket sizes: hidden² as in the Hugging Face integration, never below the floor.
    zero = ds["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["stage3_prefetch_bucket_size"] == 10_000_000
    big = training.deepspeed_config("ds_configs/zero3.json", cfg.train, 2, hidden_size=4096)
    assert big["zero_optimization"]["reduce_bucket_size"] == 4096**2
    assert big["zero_optimization"]["stage3_prefetch_bucket_size"] == int(0.9 * 4096**2)
    for name in ("zero3_offload.json", "zero2.json"):
        training.deepspeed_config(f"ds_configs/{name}", cfg.train, 2, hidden_size=64)

    bad = tmp_path / "ds.json"
    bad.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": 8,
                "bf16": {"enabled": True},
                "zero_optimization": {"stage": 3},
            }
        )
    )
    with pytest.raises(ConfigError) as err:
        training.deepspeed_config(str(bad), cfg.train, 2)
    text = str(err.value)
    assert "train_micro_batch_size_per_gpu is 8 but train.per_device_batch_size gives 2" in text
    assert "bf16.enabled is True but train.precision='fp32' gives False" in text
    bad.write_text('{"zero_optimization": {"stage": 3},\n "optimizer": }')
    with pytest.raises(ConfigError, match=r"ds.json:2: invalid JSON"):
        training.deepspeed_config(str(bad), cfg.train, 2)
    bad.write_text(json.dumps({"optimizer": {"type": "AdamW"}}))
    with pytest.raises(ConfigError, match=r"remove 'optimizer'"):
        training.deepspeed_config(str(bad), cfg.train, 2)


def test_bad_input_fails_before_any_rank_starts(pairs_root: dict[str, Any]) -> None:
    empty = run_with_pairs(pairs_root, "empty", rows=[])
    with pytest.raises(StageError, match=r"pairs.parquet: no training pairs"):
        run_stage(empty, "train")
    ds = pairs_root["root"] / "ds.json"  # inside the run root: config paths are confined there
    ds.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 3}}))
    contradicting = run_with_pairs(pairs_root, "contradicting", f"train.ds_config={ds}")
    with pytest.raises(ConfigError, match=r"train_batch_size is 64 but .* gives 4"):
        run_stage(contradicting, "train")
    live_only = run_with_pairs(
        pairs_root, "live-only", "train.objective=tdpo", "train.reference=precomputed"
    )
    with pytest.raises(ConfigError, match=r"needs the reference's full distribution"):
        run_stage(live_only, "train")
    compiled = run_with_pairs(
        pairs_root, "compiled", "train.compile=true", "train.ds_config=ds_configs/zero3.json"
    )
    with pytest.raises(ConfigError, match=r"train.compile: not with ZeRO-3"):
        run_stage(compiled, "train")
    for run in ("empty", "contradicting", "live-only", "compiled"):  # nothing was launched
        assert not (pairs_root["root"] / run / ".train.scratch").exists()


def test_learned_prior_parts_start_from_the_train_seed(pairs_root: dict[str, Any]) -> None:
    """SparsePO's mask head is initialised from train.seed: the same seed gives the same
    weights (on every rank, in every run), another seed others; torch's global generator is
    left as it was. Its sizes come from the reference model: all its layers, as in the code."""
    import torch

    configs = {
        seed: run_with_pairs(
            pairs_root, f"sparse-s{seed}", "train.objective=sparsepo", f"train.seed={seed}"
        )
        for seed in (0, 1)
    }
    plan = training.make_plan(configs[0], RunStore(configs[0]), 1)
    model = json.loads((plan.reference_dir / "config.json").read_text())
    hparams = plan.objective.hparams
    assert (hparams["hidden_size"], hparams["num_layers"]) == (
        model["hidden_size"],
        model["num_hidden_layers"],
    )
    assert plan.objective.reference_layers == model["num_hidden_layers"] > 1
    # the mask heads train at the policy's rate, as in SparsePO's trainer; prior_lr overrides
    train = configs[0].train
    assert training.prior_learning_rate(train, plan.objective) == train.learning_rate
    learnable = build_objective(train.model_copy(update={"objective": "learnable"}))
    assert training.prior_learning_rate(train, learnable) == train.prior_learning_rate
    fast = train.model_copy(update={"objective_args": {"prior_lr": 0.5}})
    assert training.prior_learning_rate(fast, plan.objective) == 0.5
    too_many = run_with_pairs(
        pairs_root,
        "sparse-deep",
        "train.objective=sparsepo",
        "train.objective_args={num_layers: 9}",
    )
    with pytest.raises(ConfigError, match=r"num_layers=9: the reference model .* 2 layers"):
        training.make_plan(too_many, RunStore(too_many), 1)

    def mask_weights(seed: int) -> list[torch.Tensor]:
        plan = training.make_plan(configs[seed], RunStore(configs[seed]), 1)
        return [p.detach().clone() for p in plan.objective.parameters()]

    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    first, again, other = mask_weights(0), mask_weights(0), mask_weights(1)
    assert first and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    assert torch.equal(torch.rand(3), before)


def test_launch_plan_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NNODES", "2")
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("NPROC", "1")
    with pytest.raises(ConfigError, match="set MASTER_ADDR"):
        distributed.launch_plan("auto")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    plan = distributed.launch_plan("auto")
    assert (plan.world_size, plan.node_rank, plan.master_port) == (2, 1, 29500)
    cmd = distributed.launcher_command(plan, "stages.train", ["--config", "x.yaml"])
    assert "deepspeed.launcher.launch" in cmd and "--node_rank=1" in cmd and "--module" in cmd
    assert cmd[-3:] == ["stages.train", "--config", "x.yaml"]
    info = json.loads(base64.urlsafe_b64decode(cmd[4].split("=", 1)[1]))
    assert info == {"node0": [0], "node1": [0]}
    monkeypatch.setenv("NODE_RANK", "2")
    with pytest.raises(ConfigError, match="NODE_RANK=2 must be < NNODES=2"):
        distributed.launch_plan("auto")
    monkeypatch.setenv("NODE_RANK", "0")
    monkeypatch.setenv("MIDPO_LAUNCHER", "torchrun")
    cmd = distributed.launcher_command(distributed.launch_plan(2), "stages.train", [])
    assert "--nnodes=2" in cmd and "--nproc_per_node=1" in cmd


# -- launched: the stage over 2 ranks ----------------------------------------------------------


@pytest.fixture(scope="module")
def trained(pairs_root: dict[str, Any]) -> RunConfig:
    """One uninterrupted 2-rank run of the stage (in-process call: it launches itself)."""
    cfg = run_with_pairs(pairs_root, "trained")
    with pytest.MonkeyPatch.context() as mp:
        for key in ("RANK", "LOCAL_RANK", "NNODES", "NODE_RANK", "MASTER_PORT", "HOSTFILE"):
            mp.delenv(key, raising=False)
        mp.setenv("NPROC", "2")
        run_stage(cfg, "train")
    return cfg


def test_two_rank_stage_learns_partitions_and_exports(trained: RunConfig) -> None:
    import mlflow
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline import tracking
    from pipeline.objectives import response_token_stats

    m, history = manifest(trained), metrics(trained)
    assert m["steps"] == 12 and [h["step"] for h in history] == list(range(1, 13))
    assert m["world_size"] == 2 and m["reference"] == "precomputed"
    # the loss starts at log 2 (policy = reference) and falls on this learnable problem
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert max(h["loss"] for h in history[-4:]) < 0.6
    assert history[-1]["rewards/accuracies"] == 1.0
    assert {h["pairs"] for h in history[:4]} == {4.0, 1.0}  # uneven last batch kept
    # the checkpoints served a resume only: gone once the model is exported (the folder stays)
    scratch = RunStore(trained).scratch_dir("train")
    assert list(scratch.glob("ckpt-*/metrics.jsonl"))
    assert not list(scratch.glob("ckpt-*/step*")) and not list(scratch.glob("ckpt-*/latest.json"))
    # each rank holds half of every parameter
    assert len(m["zero_partition"]) == 2
    for part in m["zero_partition"]:
        policy = part["policy"]
        assert policy["min_fraction"] == pytest.approx(0.5, abs=0.02)
        assert policy["max_fraction"] == pytest.approx(0.5, abs=0.02)
        assert policy["local_numel"] == pytest.approx(policy["full_numel"] / 2, rel=0.01)
    # the exported folder reloads in transformers and gives the engine's log-probs
    folder = RunStore(trained).stage_dir("train") / "model"
    check = json.loads((folder.parent / "export_check.json").read_text())
    data = training.load_pairs(
        RunStore(trained).stage_dir("score") / "pairs.parquet", max_length=64, max_prompt_length=32
    )
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    batch = training.collate(data, list(range(len(check["pair_ids"]))), 0, lm.config.pad_token_id)
    with torch.no_grad():
        hidden = lm.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state
        stats = response_token_stats(hidden, batch.input_ids, batch.response_mask, lm.lm_head)
    ours = (stats.logps * batch.response_mask).sum(1).tolist()
    assert ours == pytest.approx(check["engine_logps"], abs=1e-4)
    assert (folder / "chat_template.jinja").is_file() and (folder / "tokenizer.json").is_file()
    # one MLflow run for the stage, nested under the pipeline's run, with per-step metrics
    tracking.setup(trained)
    run = mlflow.get_run(m["mlflow_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == tracking.parent_run_id(trained)
    client = mlflow.MlflowClient()
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 12
    # the launch's automatic choices (2 CPU ranks: ZeRO-3), in the manifest and the params
    assert m["launch_choice"]["ds_config"] == "ds_configs/zero3.json"
    assert m["ds_config"]["zero_optimization"]["stage"] == 3
    for key, value in m["launch_choice"].items():
        assert run.data.params[f"train.launch.{key}"] == str(value), key
    for key in (
        "rewards/margins",
        "logps/chosen",
        "log_prior/rejected",
        "grad_norm",
        "lr",
        "tokens_per_s",
        "step_time_s",
    ):
        assert key in run.data.metrics


def test_kill_mid_epoch_then_resume_on_two_nodes(
    pairs_root: dict[str, Any], trained: RunConfig
) -> None:
    cfg = run_with_pairs(pairs_root, "killed")
    store = RunStore(cfg)
    env = {**os.environ, "NPROC": "2", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "stages.train",
        "--config",
        str(TINY),
        f"root={pairs_root['root']}",
        f"cache_dir={pairs_root['cache']}",
        "name=killed",
        *TRAIN_ARGS,
    ]
    log = pairs_root["root"] / "killed.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            cmd, env=env, cwd=REPO, start_new_session=True, stdout=sink, stderr=subprocess.STDOUT
        )
    scratch = store.scratch_dir("train")

    def latest_step() -> int:
        found = list(scratch.glob("ckpt-*/latest.json"))
        return int(json.loads(found[0].read_text())["step"]) if found else 0

    try:  # kill once two checkpoints exist (steps 3 and 6, or 6 and 9)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and latest_step() < 6:
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    assert store.complete_manifest("train") is None
    newest = latest_step()
    assert newest in (6, 9)
    # Damage the newest checkpoint: resume must notice, set it aside and take the one before.
    ckpt = next(scratch.glob("ckpt-*"))
    shard = max((ckpt / f"step{newest}").glob("*optim_states.pt"), key=lambda p: p.stat().st_size)
    full_size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(full_size // 2)
    resume_step = newest - 3
    assert resume_step % 4 != 0  # inside an epoch

    # Resume as 2 nodes x 1 process over loopback: two launcher invocations, node ranks 0 and 1.
    port = distributed.free_port()
    nodes = []
    for node in (0, 1):
        node_env = {
            **env,
            "NPROC": "1",
            "NNODES": "2",
            "NODE_RANK": str(node),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        nodes.append(
            subprocess.Popen(
                cmd,
                env=node_env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "steps, final loss" in outputs[0] and "steps, final loss" not in outputs[1]
    assert f"checkpoint {ckpt / f'step{newest}'} is damaged" in outputs[0], outputs[0][-3000:]
    assert f"{shard.name} has {full_size // 2} bytes, expected {full_size}" in outputs[0]
    assert (ckpt / f"corrupt-step{newest}").is_dir()

    m = manifest(cfg)
    assert m["resumed_from_step"] == resume_step
    assert m["world_size"] == 2 and m["nodes"] == 2
    resumed, uninterrupted = metrics(cfg), metrics(trained)
    assert [h["step"] for h in resumed] == list(range(1, 13))
    for a, b in zip(resumed, uninterrupted, strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            assert a[key] == pytest.approx(b[key], abs=1e-5, rel=1e-5), (a["step"], key)
    # MLflow: the killed attempt's run and the resumed one, never one per rank or per node
    import mlflow

    from pipeline import tracking

    tracking.setup(cfg)
    parent = tracking.parent_run_id(cfg)
    children = mlflow.search_runs(
        filter_string=f"tags.mlflow.parentRunId = '{parent}'", output_format="list"
    )
    trains = [r for r in children if r.info.run_name == "train"]  # (prepare has its own run)
    finished = [r for r in trains if r.info.status == "FINISHED"]
    assert len(finished) == 1 and finished[0].info.run_id == m["mlflow_run_id"]


# -- launched: every objective, precision, ZeRO config, invariances (one torchrun job) -----------


def launched_report(
    pairs_root: dict[str, Any],
    script: Path,
    head: list[str],
    run: str,
    timeout: int,
    nproc: int = 2,
) -> dict[str, Any]:
    """``script`` under torchrun (arguments ``head``, then the run root, cache, run name and
    report path) on a run with pairs named ``run``; the JSON report it writes."""
    cfg = run_with_pairs(pairs_root, run)
    out = pairs_root["root"] / f"{run}.json"
    root, cache = str(pairs_root["root"]), str(pairs_root["cache"])
    torchrun_job(script, [*head, root, cache, cfg.name, str(out)], timeout=timeout, nproc=nproc)
    return dict(json.loads(out.read_text()))


@pytest.fixture(scope="module")
def sweep(pairs_root: dict[str, Any]) -> dict[str, Any]:
    return launched_report(pairs_root, Path(__file__), ["sweep"], "sweep", timeout=400)


def test_every_objective_trains_under_zero3(sweep: dict[str, Any]) -> None:
    from pipeline.objectives import available_objectives

    assert set(sweep["objectives"]) == set(available_objectives())
    for name, run in sweep["objectives"].items():
        losses = [h["loss"] for h in run["history"]]
        assert len(losses) == 3 and all(math.isfinite(v) for v in losses), name
        assert all(math.isfinite(h["grad_norm"]) for h in run["history"]), name
    # the learnable prior has its own optimizer group, and its parameters move
    learnable = sweep["objectives"]["learnable"]["history"]
    assert learnable[0]["lr/prior"] == pytest.approx(0.05)
    first = {k: v for k, v in learnable[0].items() if k.startswith("prior/learnable")}
    assert first and any(learnable[-1][k] != v for k, v in first.items())
    # the marginal prior model takes maximum-likelihood steps, logged
    assert all("marginal/nll" in h for h in sweep["objectives"]["marginal"]["history"])
    assert sweep["objectives"]["tdpo"]["reference"] == "live"
    assert sweep["objectives"]["dpo"]["reference"] == "precomputed"


def test_live_reference_matches_precomputed(sweep: dict[str, Any]) -> None:
    live = sweep["variants"]["dpo_live"]["history"]
    pre = sweep["objectives"]["dpo"]["history"]
    for a, b in zip(live, pre, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


def test_precisions_and_zero_configs(sweep: dict[str, Any]) -> None:
    for name in ("dpo_bf16", "dpo_zero2", "dpo_zero3_offload"):
        losses = [h["loss"] for h in sweep["variants"][name]["history"]]
        assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], name
    fp32 = sweep["objectives"]["dpo"]["history"]
    same_maths = ("dpo_zero2", "dpo_zero3_offload", "dpo_gradient_checkpointing", "dpo_compiled")
    for name in same_maths:
        for a, b in zip(sweep["variants"][name]["history"], fp32, strict=True):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), name
    compiled = sweep["variants"]["dpo_compiled"]
    assert compiled["compiled"] == ["LlamaDecoderLayer"] * 2  # each of the tiny model's blocks
    assert not sweep["variants"]["dpo_zero2"]["compiled"]
    assert compiled["export_check"]["max_abs_diff"] < 1e-4
    # bf16 export reproduces the engine (its rotary frequencies are float32 in both)
    assert sweep["variants"]["dpo_bf16"]["export_check"]["max_abs_diff"] < 1e-3
    bf16 = sweep["variants"]["dpo_bf16"]["history"]
    assert bf16[-1]["loss"] == pytest.approx(fp32[-1]["loss"], abs=0.02)
    zero1 = sweep["variants"]["dpo_bf16_zero1"]["history"]
    for a, b in zip(zero1, fp32, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=0.02)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=0.05)


def test_bf16_optimizer_steps_without_a_host_read_per_parameter(sweep: dict[str, Any]) -> None:
    """ZeRO-0 in bf16 takes DeepSpeed's fp16 path, which reads every parameter's overflow flag
    back to the host; the bf16 optimizer (ZeRO-1, a GPU's choice) reads a handful a step. On a
    GPU each read waits for the queue to drain."""
    zero0, zero1 = sweep["host_reads"]["zero0"], sweep["host_reads"]["zero1"]
    assert zero0["reads"] >= zero0["params"] > zero1["reads"]
    assert zero1["reads"] <= 12, zero1


def test_bf16_optimizer_resumes_exactly(sweep: dict[str, Any]) -> None:
    """ZeRO-1 in bf16 (fp32 master weights and gradients, partitioned over 2 ranks): a run
    resumed from its step-2 checkpoint repeats the uninterrupted run's steps 3 and 4."""
    check = sweep["bf16_zero1_resume"]
    assert check["resumed_from"] == 2
    assert [h["step"] for h in check["resumed"]] == [3, 4]
    for a, b in zip(check["resumed"], check["whole"][2:], strict=True):
        for key in ("loss", "grad_norm", "rewards/margins"):
            assert a[key] == b[key], (a["step"], key)


def test_dropout_draws_repeat_after_a_resume(sweep: dict[str, Any]) -> None:
    """SparsePO's mask heads with dropout 0.5: the resumed steps 3 and 4 draw the same dropout
    masks as the uninterrupted run's (seeded per step, not from the process's history)."""
    check = sweep["dropout_resume"]
    assert check["resumed_from"] == 2
    for a, b in zip(check["resumed"], check["whole"][2:], strict=True):
        for key in ("loss", "grad_norm"):
            assert a[key] == b[key], (a["step"], key)


def test_gradient_accumulation_invariance(sweep: dict[str, Any]) -> None:
    a = sweep["variants"]["batch1_accum4"]["history"]
    b = sweep["variants"]["batch4_accum1"]["history"]
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "grad_norm", "rewards/margins"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), (x["step"], key)


@pytest.fixture(scope="module")
def one_rank(pairs_root: dict[str, Any]) -> dict[str, Any]:
    head = ["one_rank"]
    return launched_report(pairs_root, Path(__file__), head, "one-rank", timeout=300, nproc=1)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_rank_accumulates_without_a_reduction(one_rank: dict[str, Any], precision: str) -> None:
    """On one rank no engine all-reduces (ZeRO-0 in fp32, the bf16 optimizer's ZeRO-1): four
    accumulated micro-batches still give the one batch of four's step (fp32 to rounding; bf16
    to its forward's rounding: the micro-batches run in other shapes)."""
    runs = one_rank[precision]
    tolerance = {"rel": 1e-5, "abs": 1e-6} if precision == "fp32" else {"rel": 5e-3, "abs": 1e-3}
    for x, y in zip(runs["batch1_accum4"], runs["batch4_accum1"], strict=True):
        for key in ("loss", "grad_norm"):
            assert x[key] == pytest.approx(y[key], **tolerance), (precision, x["step"], key)


def test_one_rank_bf16_optimizer_resumes_exactly(one_rank: dict[str, Any]) -> None:
    check = one_rank["resume"]
    assert check["resumed_from"] == 2
    for a, b in zip(check["resumed"], check["whole"][2:], strict=True):
        for key in ("loss", "grad_norm", "rewards/margins"):
            assert a[key] == b[key], (a["step"], key)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(sweep: dict[str, Any]) -> None:
    nan = sweep["nan"]
    assert "non-finite loss at optimizer step" in nan["error"]
    assert nan["poisoned"] in nan["error"]
    bad_step = int(nan["error"].split("optimizer step ")[1].split(",")[0])
    assert nan["latest_step"] == bad_step - 1  # nothing saved at or after the bad step


# -- the torchrun worker ---------------------------------------------------------------------------


def _worker_plan(cfg: RunConfig, store: RunStore, world: int, **train: Any) -> Any:
    """A TrainPlan for this run's pairs with train-section changes (the score stage's manifest
    pins train.objective for TIS-DPO weights, so the plan is assembled here, not by make_plan)."""
    tc = cfg.train.model_copy(update=train)
    data = training.load_pairs(
        store.stage_dir("score") / "pairs.parquet",
        max_length=cfg.model.max_length,
        max_prompt_length=cfg.model.max_prompt_length,
    )
    policy, reference, score_ref = training.model_dirs(cfg, store)
    objective = build_objective(tc, reference)
    mode = training.choose_reference(objective, tc, data, reference == score_ref)
    choice = training.choose(
        tc,
        policy,
        world,
        accelerator="cpu",
        live_reference=mode == "live",
        max_length=cfg.model.max_length,
    )
    ds = training.deepspeed_config(choice.ds_config, tc, world, hidden_size=64)
    key = {"train": tc.model_dump(mode="json"), "world": world}
    return training.TrainPlan(
        train=tc,
        data=data,
        policy_dir=policy,
        reference_dir=reference,
        reference_mode=mode,
        ds_config=ds,
        checkpoint_dir=training.checkpoint_dir(store.scratch_dir("train"), key),
        output_dir=None,
        world_size=world,
        max_length=cfg.model.max_length,
        objective=objective,
        export=False,
        checkpoints=False,
        choice=choice,
    )


def _resume_check(
    cfg: RunConfig, store: RunStore, ranks: distributed.Ranks, changes: dict[str, Any]
) -> dict[str, Any]:
    """4 steps with checkpoints at 2 and 4; the step-4 checkpoint removed, the same plan resumed
    from step 2: {"whole": its history, "resumed_from", "resumed": the resumed history}."""
    changes = {**changes, "max_steps": 4, "checkpoint_every": 2, "lr_scheduler": "constant"}

    def fit() -> Any:
        plan = _worker_plan(cfg, store, ranks.world_size, **changes)
        plan.checkpoints = True
        trainer = training.Trainer(plan, ranks)
        try:
            trainer.build()
            return plan, trainer.fit()
        finally:
            trainer.close()

    plan, whole = fit()
    if ranks.is_main:
        shutil.rmtree(plan.checkpoint_dir / "step4")
        (plan.checkpoint_dir / "latest.json").unlink()
    distributed.barrier()
    _, resumed = fit()
    return {
        "whole": whole.history,
        "resumed_from": resumed.resumed_from,
        "resumed": resumed.history,
    }


def _host_reads(
    cfg: RunConfig, store: RunStore, ranks: distributed.Ranks, **changes: Any
) -> dict[str, int]:
    """Host reads during one optimizer step (after a first one: lazy optimizer state), and the
    number of parameter tensors."""
    from tests.host_reads import HostReadCounter

    plan = _worker_plan(cfg, store, ranks.world_size, max_steps=2, **changes)
    trainer = training.Trainer(plan, ranks)
    try:
        trainer.build()
        trainer.engines.policy.train()
        trainer.step(0)
        counter = HostReadCounter()
        with counter:
            trainer.step(1)
        return {"reads": len(counter.reads), "params": len(list(trainer.engines.lm.parameters()))}
    finally:
        trainer.close()


def _sweep_worker(root: str, cache: str, name: str, out: str) -> None:
    from pipeline.objectives import available_objectives

    ranks = distributed.init_process_group(10)
    cfg = load_config(TINY, [f"root={root}", f"cache_dir={cache}", f"name={name}", *TRAIN_ARGS])
    store = RunStore(cfg)
    world = ranks.world_size
    if ranks.is_main:
        shutil.rmtree(store.scratch_dir("train"), ignore_errors=True)
    distributed.barrier()

    def train(export: str = "", **changes: Any) -> dict[str, Any]:
        plan = _worker_plan(cfg, store, world, **{"max_steps": 3, **changes})
        if export:  # the Hugging Face folder, reloaded and compared with the engine
            plan.export = True
            folder = store.scratch_dir("train") / "export" / export
            plan.output_dir = folder if ranks.is_main else None
        trainer = training.Trainer(plan, ranks)
        started = time.time()
        try:
            trainer.build()
            built = time.time()
            result = trainer.fit()
            compiled = [  # modules that run through torch.compile (train.compile)
                type(m).__name__
                for m in trainer.engines.lm.modules()
                if getattr(m, "_compiled_call_impl", None) is not None
            ]
        finally:
            trainer.close()
        return {
            "history": result.history,
            "reference": plan.reference_mode,
            "export_check": result.export_check,
            "seconds": [built - started, time.time() - built],
            "compiled": compiled,
        }

    args = {"learnable": {"prior_lr": 0.05}}  # sparsepo: the mask head reads all layers
    report: dict[str, Any] = {"objectives": {}, "variants": {}}
    for objective in available_objectives():
        report["objectives"][objective] = train(
            objective=objective, objective_args=args.get(objective, {})
        )
    variants = {
        "dpo_live": {"reference": "live"},
        "dpo_bf16": {"precision": "bf16", "export": "bf16"},
        # DeepSpeed's bf16 optimizer (what auto picks for bf16 where nothing needs partitioning;
        # here its optimizer state is split over the 2 ranks), accumulating in fp32
        "dpo_bf16_zero1": {
            "precision": "bf16",
            "ds_config": "ds_configs/zero1.json",
            "per_device_batch_size": 1,
            "gradient_accumulation_steps": 2,
        },
        "dpo_gradient_checkpointing": {"gradient_checkpointing": True},
        "dpo_zero2": {"ds_config": "ds_configs/zero2.json"},
        "dpo_zero3_offload": {"ds_config": "ds_configs/zero3_offload.json"},
        # blocks compiled: the same losses, and the exported folder (plain blocks) matches
        "dpo_compiled": {
            "compile": True,
            "ds_config": "ds_configs/zero2.json",
            "export": "compiled",
        },
        "batch1_accum4": {"per_device_batch_size": 1, "gradient_accumulation_steps": 4},
        "batch4_accum1": {"per_device_batch_size": 4, "gradient_accumulation_steps": 1},
    }
    for variant, changes in variants.items():
        report["variants"][variant] = train(**changes)
    report["bf16_zero1_resume"] = _resume_check(cfg, store, ranks, variants["dpo_bf16_zero1"])
    sparse = {"objective": "sparsepo", "objective_args": {"mask_dropout": 0.5}}
    report["dropout_resume"] = _resume_check(cfg, store, ranks, sparse)
    report["host_reads"] = {
        name: _host_reads(cfg, store, ranks, precision="bf16", ds_config=f"ds_configs/{name}.json")
        for name in ("zero0", "zero1")
    }

    # Absurd but finite reference log-probs (+3e38 on 12 tokens) overflow the loss to inf.
    plan = _worker_plan(cfg, store, world, checkpoint_every=1, max_steps=None, epochs=1)
    plan.checkpoints = True
    poisoned = len(plan.data) - 1
    assert plan.data.ref_chosen_logps is not None
    plan.data.chosen[poisoned] = plan.data.chosen[poisoned][:1] * 12
    plan.data.ref_chosen_logps[poisoned] = [3.0e38] * 12
    trainer = training.Trainer(plan, ranks)
    try:
        trainer.build()
        trainer.fit()
        error = "no error"
    except training.TrainingError as e:
        error = str(e)
    finally:
        trainer.close()
    latest = training.read_latest(plan.checkpoint_dir)
    report["nan"] = {
        "error": error,
        "poisoned": plan.data.pair_ids[poisoned],
        "latest_step": latest["step"] if latest else 0,
    }
    if ranks.is_main:
        Path(out).write_text(json.dumps(report))
    distributed.teardown()
    exit_cleanly(0)


def _one_rank_worker(root: str, cache: str, name: str, out: str) -> None:
    """One rank, where no engine reduces its gradients: accumulation and resume."""
    ranks = distributed.init_process_group(10)
    cfg = load_config(TINY, [f"root={root}", f"cache_dir={cache}", f"name={name}", *TRAIN_ARGS])
    store = RunStore(cfg)

    def history(**changes: Any) -> list[dict[str, float]]:
        plan = _worker_plan(cfg, store, 1, max_steps=3, **changes)
        trainer = training.Trainer(plan, ranks)
        try:
            trainer.build()
            return trainer.fit().history
        finally:
            trainer.close()

    report: dict[str, Any] = {}
    for precision, ds in (("fp32", "zero0"), ("bf16", "zero1")):
        setting = {"precision": precision, "ds_config": f"ds_configs/{ds}.json"}
        report[precision] = {
            "batch4_accum1": history(
                per_device_batch_size=4, gradient_accumulation_steps=1, **setting
            ),
            "batch1_accum4": history(
                per_device_batch_size=1, gradient_accumulation_steps=4, **setting
            ),
        }
    bf16_zero1 = {"precision": "bf16", "ds_config": "ds_configs/zero1.json"}
    report["resume"] = _resume_check(cfg, store, ranks, bf16_zero1)
    Path(out).write_text(json.dumps(report))
    distributed.teardown()
    exit_cleanly(0)


if __name__ == "__main__":
    if sys.argv[1] == "sweep":
        _sweep_worker(*sys.argv[2:6])
    elif sys.argv[1] == "one_rank":
        _one_rank_worker(*sys.argv[2:6])
