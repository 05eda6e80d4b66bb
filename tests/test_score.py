"""score stage: pair strategies on hand-made scores, DICE's length-balanced alpha, every scorer
kind on the tiny preset, offline mode, experience replay, TIS-DPO weights, bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import RunConfig
from pipeline.data import read_rows
from pipeline.models import ModelError, load_tokenizer
from pipeline.reference import TransformersLogprobs
from pipeline.rewards import vader_sentiment
from pipeline.runstore import RunStore
from pipeline.scoring import (
    PromptGroup,
    ScoringError,
    build_pairs,
    call_reward_function,
    length_balanced_alpha,
    length_gap,
    load_reward_function,
    replay_count,
    token_weights,
)
from tests.conftest import ConfigFactory, run_stage

PAIR_COLUMNS = [
    "prompt_id",
    "prompt",
    "prompt_text",
    "prompt_token_ids",
    "chosen",
    "rejected",
    "chosen_token_ids",
    "rejected_token_ids",
    "chosen_reward",
    "rejected_reward",
    "source",
    "ref_chosen_logps",
    "ref_rejected_logps",
]


def group(
    pid: str,
    rewards: list[float],
    lengths: list[float] | None = None,
    truncated: list[bool] | None = None,
    keys: list[object] | None = None,
) -> PromptGroup:
    k = len(rewards)
    return PromptGroup(
        pid,
        np.array(rewards, dtype=float),
        np.array(lengths or [1.0] * k, dtype=float),
        np.array(truncated or [False] * k),
        keys or list(range(k)),
    )


def picks(result) -> list[tuple[int, int, int]]:  # type: ignore[no-untyped-def]
    return [(p.group, p.chosen, p.rejected) for p in result.pairs]


# -- pair strategies on hand-made scores ---------------------------------------------------------
def test_best_vs_worst() -> None:
    groups = [
        group("a", [0.1, 0.9, -0.5, 0.3]),
        group("b", [0.2, 0.2, 0.2]),
        group("c", [0.5, 0.4]),
    ]
    result = build_pairs(groups)
    assert picks(result) == [(0, 1, 2), (2, 0, 1)]
    assert result.pairs[0].margin == pytest.approx(1.4)
    assert result.drops == {"prompt_tie": 1}
    # A margin floor drops c (0.1 apart); keeping ties pairs b's first and another response.
    result = build_pairs(groups, min_margin=0.2, drop_ties=False)
    assert picks(result) == [(0, 1, 2)]
    assert result.drops == {"prompt_below_margin": 2}
    assert picks(build_pairs(groups[1:2], drop_ties=False)) == [(0, 0, 1)]


def test_margin_strategy_takes_every_pair_above_the_margin() -> None:
    groups = [group("a", [0.0, 1.0, 0.5, 1.0])]
    assert sorted(picks(build_pairs(groups, strategy="margin"))) == [
        (0, 1, 0),
        (0, 1, 2),
        (0, 2, 0),
        (0, 3, 0),
        (0, 3, 2),
    ]
    assert sorted(picks(build_pairs(groups, strategy="margin", min_margin=0.6))) == [
        (0, 1, 0),
        (0, 3, 0),
    ]
    # Ties kept on request: the tied pair appears once, in index order.
    assert (0, 1, 3) in picks(build_pairs(groups, strategy="margin", drop_ties=False))


def test_random_strategy_is_seeded_and_orders_by_reward() -> None:
    groups = [group(f"p{i}", list(np.random.default_rng(i).normal(size=6))) for i in range(40)]
    a = picks(build_pairs(groups, strategy="random", seed=3))
    assert a == picks(build_pairs(groups, strategy="random", seed=3))
    assert a != picks(build_pairs(groups, strategy="random", seed=4))
    assert all(groups[g].rewards[c] > groups[g].rewards[r] for g, c, r in a)
    assert len({(c, r) for _, c, r in a}) > 5  # not always the same two indices


def test_truncated_invalid_duplicate_and_all_equal_responses() -> None:
    groups = [
        group("trunc", [0.9, 0.1, 0.5], truncated=[True, False, False]),
        group("nan", [math.nan, 0.2, 0.7]),
        group("dup", [0.4, 0.4, 0.1], keys=["x", "x", "y"]),
        group("same", [0.3, 0.3, 0.3, 0.3], keys=["z"] * 4),
        group("one-left", [0.1, 0.2], truncated=[True, False]),
    ]
    result = build_pairs(groups)
    assert picks(result) == [(0, 2, 1), (1, 2, 1), (2, 0, 2)]
    assert result.drops == {
        "response_truncated": 2,
        "response_invalid_reward": 1,
        "response_duplicate": 1,
        "prompt_all_samples_equal": 1,
        "prompt_too_few_responses": 1,
    }
    kept = build_pairs(groups, drop_truncated=False)
    assert picks(kept)[0] == (0, 0, 1)  # the truncated best response is allowed back in


def test_dice_alpha_balances_lengths_on_a_constructed_case() -> None:
    """Four prompts prefer the response 2 longer (reward gaps 0.1..0.4: their choice flips at
    alpha = gap / 2 = 0.05, 0.10, 0.15, 0.20), two prefer the one 2 shorter (never flips).
    alpha = 0: chosen are longer by (4*2 - 2*2)/6; past the first crossing (0.05) one prompt
    flips and the means balance exactly, so alpha lies in (0.05, 0.10)."""
    groups = [group(f"long{i}", [0.1 * i, 0.0], lengths=[12, 10]) for i in range(1, 5)]
    groups += [group(f"short{i}", [0.3, 0.0], lengths=[8, 10]) for i in range(2)]
    assert length_gap(groups, build_pairs(groups)) == pytest.approx(4 / 6)
    alpha = length_balanced_alpha(groups)
    assert 0.05 < alpha < 0.10
    balanced = build_pairs(groups, alpha=alpha)
    assert length_gap(groups, balanced) == 0.0
    assert [p.chosen for p in balanced.pairs] == [1, 0, 0, 0, 0, 0]  # only long1 flipped
    # Nothing to balance: alpha stays 0.
    assert length_balanced_alpha([group("a", [1.0, 0.0], lengths=[5, 5])]) == 0.0


def test_replay_count() -> None:
    assert replay_count(30, 0.25, 100) == 10  # 10 of 40 = 25%
    assert replay_count(30, 0.25, 4) == 4
    assert replay_count(30, 0.0, 100) == 0


def test_reward_function_errors_are_reported_per_row() -> None:
    def reward(prompts: list[str], responses: list[str]) -> list[float]:
        out = []
        for r in responses:
            if r == "boom":
                raise RuntimeError("cannot score this")
            out.append(math.nan if r == "nan" else math.inf if r == "inf" else float(len(r)))
        return out

    rewards, errors = call_reward_function(
        reward, ["p"] * 5, ["ok", "boom", "nan", "fine", "inf"], batch_size=2
    )
    assert rewards[0] == 2.0 and rewards[3] == 4.0
    assert errors == {
        1: "raised RuntimeError: cannot score this",
        2: "returned nan",
        4: "returned inf",
    }
    _, errors = call_reward_function(lambda p, r: [1.0], ["p"] * 2, ["a", "b"], batch_size=2)
    assert errors == {}  # the batch's wrong count was retried row by row, which works


# -- the stage on the tiny preset ---------------------------------------------------------------
@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory, tiny_prepared: RunConfig) -> Path:
    """A tiny run root with prepare and generate (transformers backend) done."""
    from pipeline.config import load_config
    from tests.conftest import TINY

    root = tmp_path_factory.mktemp("generated") / "runs"
    cfg = load_config(TINY, [f"root={root}", f"cache_dir={tiny_prepared.cache_dir}"])
    shutil.copytree(
        RunStore(tiny_prepared).stage_dir("prepare"), RunStore(cfg).stage_dir("prepare")
    )
    run_stage(cfg, "generate")
    return root


def scored_run(tiny_config: ConfigFactory, generated: Path, *overrides: str) -> RunConfig:
    cfg = tiny_config(*overrides)
    for stage in ("prepare", "generate"):
        dest = RunStore(cfg).stage_dir(stage)
        if not dest.exists():
            shutil.copytree(generated / "tiny" / stage, dest)
    return cfg


def model_dir(cfg: RunConfig) -> Path:
    return Path(RunStore(cfg).require("prepare")["model_dir"])


def perturbed_model(src: Path, dest: Path, scale: float = 0.05) -> Path:
    """The same model and tokenizer with noise on every weight (a stand-in trained policy)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    weights = load_file(str(dest / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    save_file(
        {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in weights.items()},
        str(dest / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return dest


def test_score_end_to_end(tiny_config: ConfigFactory, generated: Path) -> None:
    cfg = scored_run(tiny_config, generated)
    run_stage(cfg, "score")
    store = RunStore(cfg)
    out = store.stage_dir("score")
    assert pq.read_schema(out / "pairs.parquet").names == PAIR_COLUMNS
    pairs = read_rows(out / "pairs.parquet")
    samples = {
        r["prompt_id"]: r for r in read_rows(store.stage_dir("generate") / "samples.parquet")
    }
    scored = read_rows(out / "scored.parquet")
    assert len(scored) == 4 * len(samples)
    assert [r["reward"] for r in scored] == vader_sentiment(
        [""] * len(scored), [r["response"] for r in scored]
    )
    manifest = store.require("score")
    assert manifest["scorer"] == "pipeline.rewards:vader_sentiment"
    assert manifest["reference_model_dir"] == manifest["policy_model_dir"] == str(model_dir(cfg))
    assert len(pairs) + sum(
        v for k, v in manifest["drops"].items() if k.startswith("prompt_")
    ) == len(samples)
    for p in pairs:
        s = samples[p["prompt_id"]]
        c, r = s["responses"].index(p["chosen"]), s["responses"].index(p["rejected"])
        assert p["chosen_token_ids"] == s["response_token_ids"][c]
        assert p["rejected_token_ids"] == s["response_token_ids"][r]
        assert p["prompt_token_ids"] == s["prompt_token_ids"] and p["source"] == "generated"
        rewards = [x["reward"] for x in scored if x["prompt_id"] == p["prompt_id"]]
        assert p["chosen_reward"] == max(rewards) > p["rejected_reward"] == min(rewards)
        assert len(p["ref_chosen_logps"]) == len(p["chosen_token_ids"])
    # Reference log-probs are those of the reference model (unbatched forward, fp32).
    engine = TransformersLogprobs(model_dir(cfg), batch_size=1)
    p = pairs[0]
    assert p["ref_rejected_logps"] == pytest.approx(
        engine([(p["prompt_token_ids"], p["rejected_token_ids"])])[0], abs=1e-5
    )
    # Summaries went to MLflow: metrics and the plot.
    import mlflow

    from pipeline import tracking

    tracking.setup(cfg)
    runs = mlflow.search_runs(
        experiment_names=[cfg.tracking.experiment], filter_string="tags.`midpo.stage` = 'score'"
    )
    assert runs.iloc[0]["metrics.pairs"] == len(pairs)
    artifacts = mlflow.MlflowClient().list_artifacts(runs.iloc[0]["run_id"])
    assert [a.path for a in artifacts] == ["summary.png"]
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"


def test_reward_function_failures(
    tiny_config: ConfigFactory, generated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my_rewards.py").write_text(
        "import math\n"
        "def flaky(prompts, responses):\n"
        "    if any(' ' not in r for r in responses):\n"
        "        raise ValueError('no space')\n"
        "    return [math.nan if len(r) % 7 == 0 else 1.0 for r in responses]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = scored_run(tiny_config, generated, "score.scorer.function=my_rewards:flaky")
    responses = [
        r
        for s in read_rows(generated / "tiny" / "generate" / "samples.parquet")
        for r in s["responses"]
    ]
    bad = sum(" " not in r or len(r) % 7 == 0 for r in responses)
    assert 0 < bad < len(responses)
    with pytest.raises(
        ScoringError,
        match=rf"{bad} of {len(responses)} responses got no valid "
        r"reward from my_rewards:flaky:\n  prompt_id \S+ "
        r"sample \d: (raised ValueError: no space|returned nan)",
    ):
        run_stage(cfg, "score")
    store = RunStore(cfg)
    assert not store.stage_dir("score").exists() and not (store.root / ".score.partial").exists()

    cfg = scored_run(
        tiny_config,
        generated,
        "score.scorer.function=my_rewards:flaky",
        "score.scorer.drop_invalid=true",
        "score.drop_ties=false",
    )
    run_stage(cfg, "score")
    manifest = RunStore(cfg).require("score")
    assert manifest["drops"]["response_invalid_reward"] == bad
    scored = read_rows(store.stage_dir("score") / "scored.parquet")
    assert sum(bool(r["invalid_reason"]) for r in scored) == bad

    for spec, message in (
        ("no_such_module:f", "cannot import 'no_such_module'"),
        ("pipeline.rewards:nope", "pipeline.rewards has no function 'nope'"),
    ):
        with pytest.raises(ScoringError, match=message):
            run_stage(scored_run(tiny_config, generated, f"score.scorer.function={spec}"), "score")


def test_all_equal_samples_give_no_pairs(tiny_config: ConfigFactory, generated: Path) -> None:
    """Greedy sampling makes a prompt's K samples identical: no pair, counted, clear error."""
    cfg = scored_run(tiny_config, generated, "generate.temperature=0")
    run_stage(cfg, "generate")
    with pytest.raises(
        ScoringError,
        match=r"no preference pairs left \(drops: "
        r"\{'prompt_all_samples_equal': 16\}; counts: ",
    ):
        run_stage(cfg, "score")


def test_reward_model_scorer(tiny_config: ConfigFactory, generated: Path, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    base = model_dir(scored_run(tiny_config, generated))
    config = AutoConfig.from_pretrained(base, num_labels=1)
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_config(config)
    rm.save_pretrained(tmp_path / "rm")
    load_tokenizer(base).save_pretrained(tmp_path / "rm")
    cfg = scored_run(
        tiny_config,
        generated,
        "score.scorer.kind=reward_model",
        f"score.scorer.model={tmp_path / 'rm'}",
        "score.scorer.batch_size=5",
    )
    run_stage(cfg, "score")
    scored = read_rows(RunStore(cfg).stage_dir("score") / "scored.parquet")
    assert len({r["reward"] for r in scored}) > 10
    # Batched (padded) scores equal one-at-a-time forwards of the chat-rendered pair.
    tok = load_tokenizer(tmp_path / "rm")
    prompts = {
        r["prompt_id"]: r["prompt"]
        for r in read_rows(RunStore(cfg).stage_dir("generate") / "samples.parquet")
    }
    rm.eval()
    for row in scored[:3]:
        text = tok.apply_chat_template(
            [
                {"role": "user", "content": prompts[row["prompt_id"]]},
                {"role": "assistant", "content": row["response"]},
            ],
            tokenize=False,
        )
        ids = tok(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            assert row["reward"] == pytest.approx(rm(**ids).logits[0, 0].item(), abs=1e-4)


def test_dice_implicit_reward_length_alpha_and_replay(
    tiny_config: ConfigFactory, generated: Path, tmp_path: Path
) -> None:
    base = model_dir(scored_run(tiny_config, generated))
    policy = perturbed_model(base, tmp_path / "policy")
    replay = tmp_path / "replay.jsonl"
    replay.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {
                    "prompt": f"Review film {i}",
                    "chosen": f"A lovely film, number {i}.",
                    "rejected": "Bad.",
                }
                for i in range(3)
            ]
        )
    )
    cfg = scored_run(
        tiny_config,
        generated,
        "score.dice.enabled=true",
        f"score.dice.policy_model={policy}",
        "score.dice.beta=0.5",
        "score.dice.replay_fraction=0.25",
        f"score.dice.replay_path={replay}",
    )
    run_stage(cfg, "score")
    store = RunStore(cfg)
    manifest = store.require("score")
    assert manifest["scorer"] == f"dice-implicit({policy} vs {base})"
    assert manifest["dice_alpha"] >= 0.0
    scored = read_rows(store.stage_dir("score") / "scored.parquet")
    samples = read_rows(store.stage_dir("generate") / "samples.parquet")
    seqs = [(samples[0]["prompt_token_ids"], ids) for ids in samples[0]["response_token_ids"]]
    pol = TransformersLogprobs(policy)(seqs)
    ref = TransformersLogprobs(base)(seqs)
    expected = [0.5 * (sum(p) - sum(r)) for p, r in zip(pol, ref, strict=True)]
    assert [r["reward"] for r in scored[:4]] == pytest.approx(expected, abs=1e-4)

    pairs = read_rows(store.stage_dir("score") / "pairs.parquet")
    generated_n = sum(p["source"] == "generated" for p in pairs)
    replayed = [p for p in pairs if p["source"] == "replay"]
    assert len(replayed) == min(3, round(0.25 * generated_n / 0.75)) > 0
    assert manifest["counts"]["replay_pairs"] == len(replayed)
    tok = load_tokenizer(base)
    for p in replayed:
        assert p["chosen"].startswith("A lovely film") and p["rejected"] == "Bad."
        assert p["rejected_token_ids"] == tok("Bad.", add_special_tokens=False)["input_ids"] + [
            tok.eos_token_id
        ]
        assert len(p["ref_chosen_logps"]) == len(p["chosen_token_ids"])
        assert math.isnan(p["chosen_reward"])  # not scored: the dataset has no ratings

    # The built-in task has no preference data of its own to replay.
    cfg = scored_run(
        tiny_config,
        generated,
        "score.dice.enabled=true",
        f"score.dice.policy_model={policy}",
        "score.dice.replay_fraction=0.25",
    )
    with pytest.raises(ScoringError, match="needs score.dice.replay_path"):
        run_stage(cfg, "score")


def test_tisdpo_token_weights(tiny_config: ConfigFactory, generated: Path, tmp_path: Path) -> None:
    # Default contrastive pair (generating policy vs reference): the same model here, so every
    # token's score is 0 and its weight 1 (TIS-DPO reduces to DPO); the final EOS gets 0.
    cfg = scored_run(tiny_config, generated, "train.objective=tisdpo", "score.drop_truncated=false")
    run_stage(cfg, "score")
    store = RunStore(cfg)
    eos = load_tokenizer(model_dir(cfg)).eos_token_id
    pairs = read_rows(store.stage_dir("score") / "pairs.parquet")
    for p in pairs:
        for side in ("chosen", "rejected"):
            ids, weights = p[f"{side}_token_ids"], p[f"{side}_weights"]
            ends = ids[-1] == eos
            assert weights == [1.0] * (len(ids) - ends) + [0.0] * ends

    positive = perturbed_model(model_dir(cfg), tmp_path / "positive", scale=0.2)
    cfg = scored_run(
        tiny_config, generated, "train.objective=tisdpo", f"score.tisdpo_positive_model={positive}"
    )
    run_stage(cfg, "score")
    pairs = read_rows(store.stage_dir("score") / "pairs.parquet")
    p = pairs[0]
    seq = [(p["prompt_token_ids"], p["chosen_token_ids"])]
    pos = TransformersLogprobs(positive)(seq)[0]
    neg = TransformersLogprobs(model_dir(cfg))(seq)[0]
    expected = token_weights(
        pos,
        neg,
        "chosen",
        "threshold_and_scale",
        {},
        ends_with_eos=p["chosen_token_ids"][-1] == eos,
    )
    assert p["chosen_weights"] == pytest.approx(expected, abs=1e-6)
    assert len(set(p["chosen_weights"])) > 1
    assert all(0.7 - 1e-6 <= w <= 1.3 + 1e-6 for w in expected[:-1])


def test_offline_mode(tiny_config: ConfigFactory, tmp_path: Path) -> None:
    rows = [
        {
            "prompt": f"Describe film {i}.",
            "chosen": f"A warm and funny film, {i}.",
            "rejected": f"Dull, {i}.",
        }
        for i in range(8)
    ]
    rows += [
        {
            "prompt": [{"role": "user", "content": f"Rate movie {i}"}],
            "chosen": [{"role": "assistant", "content": "Great fun."}],
            "rejected": [{"role": "assistant", "content": "Awful."}],
        }
        for i in range(4)
    ]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config("data.task=preference", f"data.path={path}")
    for stage in ("prepare", "generate", "score"):
        run_stage(cfg, stage)
    store = RunStore(cfg)
    assert not store.stage_dir("generate").exists()  # offline: nothing generated
    train_rows = read_rows(store.stage_dir("prepare") / "preference.parquet")
    pairs = read_rows(store.stage_dir("score") / "pairs.parquet")
    assert len(pairs) == len(train_rows) and {p["source"] for p in pairs} == {"offline"}
    assert store.require("score")["input_hashes"].keys() == {"prepare"}
    tok = load_tokenizer(model_dir(cfg))
    for p in pairs:
        joint = tok(p["prompt_text"] + p["chosen"], add_special_tokens=False)["input_ids"]
        assert p["prompt_token_ids"] + p["chosen_token_ids"] == joint + [tok.eos_token_id]
        assert len(p["ref_rejected_logps"]) == len(p["rejected_token_ids"])


def test_missing_reference_model(
    tiny_config: ConfigFactory, generated: Path, tmp_path: Path
) -> None:
    cfg = scored_run(tiny_config, generated, f"score.reference_model={tmp_path / 'nope'}")
    with pytest.raises(
        ModelError, match=f"score.reference_model: model folder {tmp_path / 'nope'} does not exist"
    ):
        run_stage(cfg, "score")
    assert not RunStore(cfg).stage_dir("score").exists()


def test_skip_when_unchanged_rerun_when_reference_weights_change(
    tiny_config: ConfigFactory, generated: Path, tmp_path: Path
) -> None:
    reference = tmp_path / "reference"
    shutil.copytree(model_dir(scored_run(tiny_config, generated)), reference)
    cfg = scored_run(tiny_config, generated, f"score.reference_model={reference}")
    run_stage(cfg, "score")
    manifest = RunStore(cfg).stage_dir("score") / "manifest.json"
    first = json.loads(manifest.read_text())
    run_stage(cfg, "score")
    assert json.loads(manifest.read_text()) == first  # up to date: not rerun
    # Same path, new weights (a re-exported model): the stage notices and scores again.
    shutil.rmtree(reference)
    perturbed_model(model_dir(cfg), reference)
    run_stage(cfg, "score")
    second = json.loads(manifest.read_text())
    assert second["fingerprints"]["reference"] != first["fingerprints"]["reference"]
    assert second["outputs"]["pairs.parquet"] != first["outputs"]["pairs.parquet"]


# -- library pieces the stage is built from ------------------------------------------------------
def test_text_pairs_build_pair_records_and_label_warnings(
    tiny_config: ConfigFactory, tiny_prepared: RunConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    """Dataset pairs go through the one pair builder: parquet rows carry exactly the pair
    columns (no bookkeeping keys, weight columns only when computed); a warning names the stage
    that asked (evaluate's human pairs are not labelled [score])."""
    from pipeline.pairing import pair_rows, text_pairs
    from pipeline.records import PAIR_COLUMNS as RECORD_COLUMNS

    cfg = tiny_config()
    tok = load_tokenizer(model_dir(tiny_prepared))
    rows = [
        {
            "prompt_id": "a",
            "prompt": "p",
            "prompt_text": "The movie was gre",
            "chosen": "at fun",
            "rejected": "bad",
            "chosen_rating": 2.0,
            "rejected_rating": -1.0,
        },
        {
            "prompt_id": "b",
            "prompt": "q",
            "prompt_text": "A film. ",
            "chosen": "Good.",
            "rejected": "Good.",
        },
    ]
    pairs, stats = text_pairs(rows, tok, cfg, "human", "rows.jsonl", stage="evaluate")
    err = capsys.readouterr().err
    assert err.startswith("[evaluate] ") and "response(s) in rows.jsonl merged" in err
    assert stats["pairs_identical_after_cut"] == 1 and len(pairs) == 1
    assert pairs[0].keys == {"chosen": ("a", "chosen"), "rejected": ("a", "rejected")}
    row = pair_rows(pairs, weights=False)[0]
    assert list(row) == PAIR_COLUMNS
    assert (row["chosen_reward"], row["rejected_reward"], row["source"]) == (2.0, -1.0, "human")
    assert row["rejected_token_ids"] == tok("bad", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id
    ]
    assert list(pair_rows(pairs, weights=True)[0]) == list(RECORD_COLUMNS)


def test_scorer_for_checks_the_model_folder(tiny_config: ConfigFactory, tmp_path: Path) -> None:
    from pipeline.scoring import scorer_for

    for kind in ("reward_model", "judge"):
        cfg = tiny_config(f"score.scorer.kind={kind}", f"score.scorer.model={tmp_path / 'gone'}")
        with pytest.raises(
            ModelError, match=f"score.scorer.model: model folder {tmp_path / 'gone'} does not exist"
        ):
            scorer_for(cfg)
    scorer = scorer_for(tiny_config())
    rewards, errors = scorer(["p", "q"], [["good", "bad"], ["great"]])
    assert scorer.name == "pipeline.rewards:vader_sentiment" and errors == {}
    assert list(rewards) == vader_sentiment([""] * 3, ["good", "bad", "great"])


def test_judge_releases_only_an_engine_it_started(
    tiny_config: ConfigFactory, tiny_prepared: RunConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The judge's vLLM engine is shut down after use, unless it was already running (generate's
    engine in the same process, which vLLM reference log-probs reuse next)."""
    from pipeline import generation, scoring

    released: list[object] = []
    engines = iter([object(), object()])

    def fake_vllm_for(cfg: RunConfig, path: Path, dtype: str) -> object:
        if "llm" not in generation._ENGINE:
            generation._ENGINE["llm"] = next(engines)
        return generation._ENGINE["llm"]

    def fake_release() -> None:
        released.append(generation._ENGINE.pop("llm"))

    monkeypatch.setattr(scoring, "vllm_for", fake_vllm_for)
    monkeypatch.setattr(scoring, "release_vllm_engine", fake_release)
    monkeypatch.setattr(generation, "_ENGINE", {})
    cfg = tiny_config("score.scorer.kind=judge", f"score.scorer.model={model_dir(tiny_prepared)}")
    with scoring.scorer_for(cfg) as judge:  # starts its own engine: released after use
        started = judge.judge.llm if judge.judge else None
        assert judge.name == f"judge({model_dir(tiny_prepared)})"
    assert released == [started] and "llm" not in generation._ENGINE
    running = fake_vllm_for(cfg, model_dir(tiny_prepared), "float32")  # e.g. generate's
    with scoring.scorer_for(cfg):
        pass
    assert released == [started] and generation._ENGINE["llm"] is running


def test_reward_function_must_be_a_function_taking_prompts_and_responses(
    tiny_config: ConfigFactory, generated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Config is code, within limits: a standard-library callable (os:system) is refused before
    anything is imported; a module's non-function or a function of other arguments is refused
    with its signature, not called."""
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="os is a standard-library module"):
        tiny_config("score.scorer.function=os:system")
    with pytest.raises(ScoringError, match="subprocess is a standard-library module"):
        load_reward_function("subprocess:call")
    (tmp_path / "shaped_rewards.py").write_text(
        "THRESHOLD = 3\n"
        "class Scorer:\n"
        "    def __init__(self, prompts, responses): pass\n"
        "def one_argument(responses):\n"
        "    return [1.0 for _ in responses]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec, message in (
        ("shaped_rewards:THRESHOLD", "shaped_rewards.THRESHOLD is not a Python function"),
        ("shaped_rewards:Scorer", "shaped_rewards.Scorer is not a Python function"),
        (
            "shaped_rewards:one_argument",
            r"shaped_rewards.one_argument\(responses\) does not take \(prompts, responses\)",
        ),
    ):
        with pytest.raises(ScoringError, match=message):
            run_stage(scored_run(tiny_config, generated, f"score.scorer.function={spec}"), "score")


def test_edited_reward_module_reruns_score(
    tiny_config: ConfigFactory, generated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reward function's module is an input: edited in place, score runs again."""
    module = tmp_path / "edited_rewards.py"
    module.write_text("def length(prompts, responses):\n    return [len(r) for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = scored_run(tiny_config, generated, "score.scorer.function=edited_rewards:length")
    store = RunStore(cfg)
    run_stage(cfg, "score")
    first = store.require("score")
    run_stage(cfg, "score")
    assert store.require("score")["finished"] == first["finished"]  # unchanged: skipped
    module.write_text("def length(prompts, responses):\n    return [-len(r) for r in responses]\n")
    run_stage(cfg, "score")
    second = store.require("score")
    assert (
        second["fingerprints"]["score.scorer.function"]
        != (first["fingerprints"]["score.scorer.function"])
    )
    assert second["started"] >= first["finished"] and second["output_hash"]


def test_dice_replay_without_generated_pairs_is_a_clear_error(
    tiny_config: ConfigFactory, generated: Path, tmp_path: Path
) -> None:
    """DICE with the generating model as its own policy rewards every response 0: every pair is
    a tie, none is generated, and replay has no share to fill. One clear error, no IndexError."""
    replay = tmp_path / "replay.jsonl"
    replay.write_text(json.dumps({"prompt": "p", "chosen": "Good.", "rejected": "Bad."}) + "\n")
    cfg = scored_run(
        tiny_config,
        generated,
        "score.dice.enabled=true",
        "score.dice.replay_fraction=0.25",
        f"score.dice.replay_path={replay}",
    )
    with pytest.raises(ScoringError, match=r"no preference pairs left \(drops: .*tie"):
        run_stage(cfg, "score")
