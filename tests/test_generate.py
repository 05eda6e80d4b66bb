"""generate stage: both backends on the tiny preset (same schema), determinism, resume, bad input.

vLLM starts in ~15-30 s, so it runs once: one subprocess generates with vLLM and then scores
with the vLLM judge and vLLM reference log-probs, reusing one engine (``vllm_tiny_run``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pipeline import generation
from pipeline.config import ConfigError, RunConfig
from pipeline.data import read_rows
from pipeline.generation import GenerationError, prepare_prompts
from pipeline.models import ModelError, load_causal_lm, load_tokenizer
from pipeline.reference import TransformersLogprobs
from pipeline.runstore import RunStore
from tests.conftest import REPO, TINY, ConfigFactory, command_line, run_stage

SAMPLE_COLUMNS = [
    "prompt_id",
    "prompt",
    "prompt_text",
    "prompt_token_ids",
    "responses",
    "response_token_ids",
    "finish_reasons",
    "sampling_logprobs",
]


def prepared(tiny_config: ConfigFactory, tiny_prepared: RunConfig, *overrides: str) -> RunConfig:
    """A tiny config in this test's tmp root holding a copy of the session's prepare output
    (prepare runs again when the overrides change what it depends on: model.*, data.*)."""
    cfg = tiny_config(*overrides)
    dest = RunStore(cfg).stage_dir("prepare")
    if any(o.startswith(("model.", "data.")) for o in overrides):
        run_stage(cfg, "prepare")
    elif not dest.exists():
        shutil.copytree(RunStore(tiny_prepared).stage_dir("prepare"), dest)
    return cfg


def base_model_dir(cfg: RunConfig) -> Path:
    return Path(RunStore(cfg).require("prepare")["model_dir"])


def check_samples(cfg: RunConfig, rows: list[dict]) -> None:
    """The samples.parquet contract, checked row by row against the tokenizer and config."""
    tok = load_tokenizer(base_model_dir(cfg))
    prompts = read_rows(RunStore(cfg).stage_dir("prepare") / "prompts" / "train.parquet")
    assert [r["prompt_id"] for r in rows] == [p["prompt_id"] for p in prompts]
    for r in rows:
        n = cfg.generate.n
        assert len(r["responses"]) == len(r["response_token_ids"]) == n
        assert len(r["finish_reasons"]) == len(r["sampling_logprobs"]) == n
        assert 0 < len(r["prompt_token_ids"]) <= cfg.model.max_prompt_length
        for text, ids, reason, lps in zip(
            r["responses"],
            r["response_token_ids"],
            r["finish_reasons"],
            r["sampling_logprobs"],
            strict=True,
        ):
            assert 1 <= len(ids) <= cfg.generate.max_tokens
            assert len(lps) == len(ids) and all(lp <= 0 for lp in lps)
            assert text == tok.decode(ids, skip_special_tokens=True)
            # EOS is kept exactly when the sample stopped on it.
            assert (reason == "stop") == (ids[-1] == tok.eos_token_id)
            assert reason == "stop" or len(ids) == cfg.generate.max_tokens


def test_transformers_backend_end_to_end(
    tiny_config: ConfigFactory, tiny_prepared: RunConfig
) -> None:
    cfg = prepared(tiny_config, tiny_prepared)
    run_stage(cfg, "generate")
    store = RunStore(cfg)
    out = store.stage_dir("generate") / "samples.parquet"
    assert pq.read_schema(out).names == SAMPLE_COLUMNS
    rows = read_rows(out)
    check_samples(cfg, rows)
    manifest = store.require("generate")
    assert manifest["backend"] == "transformers"
    assert manifest["model_dir"] == str(base_model_dir(cfg))
    assert manifest["sampling"] == {
        "n": 4,
        "temperature": 1.0,
        "top_p": 1.0,
        "max_tokens": 12,
        "seed": 0,
    }
    assert manifest["summary"]["samples"] == 4 * len(rows)
    # The tiny preset's prompts are longer than 32 tokens for some rows: truncated, counted.
    tok = load_tokenizer(base_model_dir(cfg))
    long = sum(
        len(tok(r["prompt_text"], add_special_tokens=False)["input_ids"]) > 32
        for r in read_rows(store.stage_dir("prepare") / "prompts" / "train.parquet")
    )
    assert manifest["summary"]["truncated_prompts"] == long

    # Sampling log-probs are the model's own: a plain fp32 forward gives the same values.
    model = load_causal_lm(base_model_dir(cfg))
    r = rows[0]
    ids = r["prompt_token_ids"] + r["response_token_ids"][0]
    with torch.no_grad():
        logps = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    p = len(r["prompt_token_ids"])
    expected = [
        logps[p - 1 + t, tok_id].item() for t, tok_id in enumerate(r["response_token_ids"][0])
    ]
    assert r["sampling_logprobs"][0] == pytest.approx(expected, abs=1e-4)

    # Up to date: skipped. Forced: the same bytes (per-prompt seeds).
    before = json.loads((store.stage_dir("generate") / "manifest.json").read_text())
    run_stage(cfg, "generate")
    assert json.loads((store.stage_dir("generate") / "manifest.json").read_text()) == before
    run_stage(cfg, "generate", force=True)
    after = store.require("generate")
    assert after["outputs"] == before["outputs"]

    # A different seed gives different samples.
    other = prepared(tiny_config, tiny_prepared, "generate.seed=1")
    run_stage(other, "generate")
    assert read_rows(out)[0]["response_token_ids"] != r["response_token_ids"]


def test_seeds_do_not_depend_on_batching(
    tiny_config: ConfigFactory, tiny_prepared: RunConfig
) -> None:
    """A prompt's samples depend on (seed, prompt id) only, not on what shares its batch."""
    cfg = prepared(tiny_config, tiny_prepared)
    sampler = generation.TransformersSampler(base_model_dir(cfg))
    tok = sampler.tokenizer
    prompts = [
        tok(
            tok.apply_chat_template(
                [{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True
            ),
            add_special_tokens=False,
        )["input_ids"]
        for t in ("a good film", "the plot was thin and slow", "fine")
    ]
    settings = generation.SamplingSettings(n=3, temperature=1.0, top_p=0.9, max_tokens=8, seed=0)
    together = sampler.sample(prompts, [11, 22, 33], settings)
    alone = sampler.sample(prompts[1:2], [22], settings)
    assert [c.token_ids for c in alone[0]] == [c.token_ids for c in together[1]]
    assert len({tuple(c.token_ids) for c in together[1]}) > 1  # the n samples differ


def test_row_sampling_follows_temperature_and_top_p() -> None:
    """The transformers backend's per-row sampler draws from softmax(logits / T), restricted to
    the smallest top-p set: frequencies over 4000 seeded rows match the distribution."""
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    rows = 4000
    scores = probs.log().repeat(rows, 1)

    def frequencies(temperature: float, top_p: float) -> torch.Tensor:
        gens = [torch.Generator().manual_seed(i) for i in range(rows)]
        proc = generation._sampling_processor(gens, temperature, top_p)
        out = proc(torch.zeros((rows, 1), dtype=torch.long), scores.clone())
        picked = out.argmax(-1)
        assert torch.allclose(proc.logps[0], probs.log()[picked])  # raw log-probs of the picks
        return torch.bincount(picked, minlength=4) / rows

    assert torch.allclose(frequencies(1.0, 1.0), probs, atol=0.03)
    # top_p 0.5 keeps 0.4 and 0.3 (0.4 alone is short of 0.5), renormalised.
    assert torch.allclose(frequencies(1.0, 0.5), torch.tensor([0, 0, 3 / 7, 4 / 7]), atol=0.03)
    tempered = torch.softmax(probs.log() / 0.5, -1)
    assert torch.allclose(frequencies(0.5, 1.0), tempered, atol=0.03)
    greedy = generation._sampling_processor(None, 0.0, 1.0)
    assert greedy(torch.zeros((2, 1), dtype=torch.long), scores[:2].clone()).argmax(
        -1
    ).tolist() == [3, 3]


def test_resume_reuses_finished_chunks(
    tiny_config: ConfigFactory, tiny_prepared: RunConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the first chunk: no output appears; the rerun samples only what is left and
    produces exactly the uninterrupted result."""
    cfg = prepared(tiny_config, tiny_prepared, "generate.chunk_size=8", "generate.batch_size=4")
    calls: list[int] = []
    real = generation.TransformersSampler.sample

    def failing(self, prompts, seeds, settings):  # type: ignore[no-untyped-def]
        calls.append(len(prompts))
        if len(calls) == 3:
            raise KeyboardInterrupt  # the run dies inside the second chunk
        return real(self, prompts, seeds, settings)

    monkeypatch.setattr(generation.TransformersSampler, "sample", failing)
    store = RunStore(cfg)
    with pytest.raises(KeyboardInterrupt):
        run_stage(cfg, "generate")
    assert not store.stage_dir("generate").exists()
    assert store.complete_manifest("generate") is None
    assert not (store.root / ".generate.partial").exists()

    calls.clear()
    run_stage(cfg, "generate")
    assert calls == [4, 4]  # chunk 0 (prompts 0-7) came from scratch; chunk 1 sampled again
    resumed = store.require("generate")["outputs"]
    assert not store.scratch_dir("generate").exists()
    monkeypatch.setattr(generation.TransformersSampler, "sample", real)
    run_stage(cfg, "generate", force=True)
    assert store.require("generate")["outputs"] == resumed


def test_chunks_are_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished chunk appears whole or not at all: a per-process temp file renamed into place,
    removed when the write fails (a full disk), so a shared chunk folder never holds a part."""
    chunks = generation.ChunkStore(tmp_path)
    chunks.save(0, [{"prompt_id": "a"}])
    assert chunks.load(0) == [{"prompt_id": "a"}] and chunks.load(1) is None

    def full_disk(path: Path, rows: list[dict]) -> None:
        path.write_bytes(b"PAR1 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(generation, "write_rows", full_disk)
    with pytest.raises(OSError, match="No space left"):
        chunks.save(1, [{"prompt_id": "b"}])
    assert [p.name for p in tmp_path.iterdir()] == ["chunk-00000.parquet"]


# -- bad input --------------------------------------------------------------------------------
def test_empty_and_long_prompts(tiny_prepared: RunConfig) -> None:
    tok = load_tokenizer(base_model_dir(tiny_prepared))
    texts = ["<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"] * 3
    with pytest.raises(
        GenerationError,
        match=r"2 empty prompt\(s\) in prompts.parquet: "
        r"prompt_id b, c",
    ):
        prepare_prompts(
            tok,
            ["a", "b", "c"],
            ["hello there", "  ", ""],
            texts,
            32,
            "truncate",
            "prompts.parquet",
        )
    n = len(tok(texts[0], add_special_tokens=False)["input_ids"])
    with pytest.raises(GenerationError, match=rf"exceed model.max_prompt_length=4: a \({n} tokens"):
        prepare_prompts(tok, ["a"], ["hello there"], texts[:1], 4, "fail", "prompts.parquet")
    out = prepare_prompts(tok, ["a"], ["hello there"], texts[:1], 4, "truncate", "p")
    full = tok(texts[0], add_special_tokens=False)["input_ids"]
    assert out.truncated == [True] and out.token_ids == [full[-4:]]
    assert out.texts[0].endswith("assistant\n")  # the generation prompt survives


def test_long_prompts_fail_leaves_no_output(
    tiny_config: ConfigFactory, tiny_prepared: RunConfig
) -> None:
    cfg = prepared(
        tiny_config, tiny_prepared, "model.max_prompt_length=8", "generate.long_prompts=fail"
    )
    with pytest.raises(
        GenerationError,
        match=r"prompt\(s\) in .*train.parquet exceed "
        r"model.max_prompt_length=8",
    ):
        run_stage(cfg, "generate")
    store = RunStore(cfg)
    assert not store.stage_dir("generate").exists()
    assert not (store.root / ".generate.partial").exists()


def test_prompt_and_response_must_fit(tiny_config: ConfigFactory, tiny_prepared: RunConfig) -> None:
    cfg = prepared(tiny_config, tiny_prepared, "generate.max_tokens=40")
    with pytest.raises(
        ConfigError,
        match=r"generate.max_tokens \(40\) \+ model.max_prompt_length "
        r"\(32\) exceed model.max_length \(64\)",
    ):
        run_stage(cfg, "generate")


def test_bad_model_folders(
    tiny_config: ConfigFactory, tiny_prepared: RunConfig, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-model"
    cfg = prepared(tiny_config, tiny_prepared, f"generate.model={missing}")
    with pytest.raises(ModelError, match=f"model folder {missing} does not exist"):
        run_stage(cfg, "generate")
    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(base_model_dir(cfg), no_tok)
    for f in no_tok.glob("tokenizer*"):
        f.unlink()
    cfg = prepared(tiny_config, tiny_prepared, f"generate.model={no_tok}")
    with pytest.raises(ModelError, match=f"model folder {no_tok} has no tokenizer"):
        run_stage(cfg, "generate")
    assert not RunStore(cfg).stage_dir("generate").exists()


def test_cli_reports_a_missing_model_in_one_line(
    tiny_config: ConfigFactory, tiny_prepared: RunConfig, tmp_path: Path
) -> None:
    cfg = prepared(tiny_config, tiny_prepared)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.generate",
            *command_line(
                cfg, f"allowed_roots=[{tmp_path}]", f"generate.model={tmp_path / 'gone'}"
            ),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"midpo generate: error: model folder {tmp_path / 'gone'} does not exist"
    )


# -- vLLM: one subprocess, one engine -----------------------------------------------------------
VLLM_SCRIPT = """
import json
import sys
from pipeline.config import load_config
from pipeline.runstore import RunStore
from tests.conftest import run_stage

if __name__ == "__main__":
    cfg = load_config(sys.argv[1], sys.argv[2:])
    run_stage(cfg, "generate")
    first = RunStore(cfg).require("generate")["outputs"]
    run_stage(cfg, "generate", force=True)  # same engine, same seeds: the same samples?
    (cfg.run_dir / "first_generate_outputs.json").write_text(json.dumps(first))
    run_stage(cfg, "score")
    from pipeline.cli import exit_cleanly

    exit_cleanly(0)  # as `python -m stages.<stage>` ends
"""


@pytest.fixture(scope="module")
def vllm_tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_prepared: RunConfig) -> RunConfig:
    """generate (vLLM) -> score (vLLM judge, vLLM reference log-probs) in one process."""
    from pipeline.config import load_config

    root = tmp_path_factory.mktemp("vllm") / "runs"
    model_dir = Path(RunStore(tiny_prepared).require("prepare")["model_dir"])
    overrides = [
        f"root={root}",
        f"cache_dir={tiny_prepared.cache_dir}",
        "generate.backend=vllm",
        "score.scorer.kind=judge",
        f"score.scorer.model={model_dir}",
        "score.reference_logps=vllm",
        "score.drop_ties=false",
    ]
    cfg = load_config(TINY, overrides)
    shutil.copytree(
        RunStore(tiny_prepared).stage_dir("prepare"), RunStore(cfg).stage_dir("prepare")
    )
    script = root.parent / "run_vllm.py"
    script.write_text(textwrap.dedent(VLLM_SCRIPT))
    proc = subprocess.run(
        [sys.executable, str(script), str(TINY), *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Sampling, judging and reference log-probs shared one engine (same folder and dtype).
    assert proc.stderr.count("[vllm] starting engine") == 1, proc.stderr[-4000:]
    return cfg


@pytest.mark.slow
def test_vllm_backend_same_schema(
    vllm_tiny_run: RunConfig, tiny_config: ConfigFactory, tiny_prepared: RunConfig
) -> None:
    cfg = vllm_tiny_run
    store = RunStore(cfg)
    out = store.stage_dir("generate") / "samples.parquet"
    rows = read_rows(out)
    check_samples(cfg, rows)
    assert store.require("generate")["backend"] == "vllm"
    # Deterministic for a seed: a forced rerun in the same process wrote the same bytes.
    first = json.loads((cfg.run_dir / "first_generate_outputs.json").read_text())
    assert store.require("generate")["outputs"] == first
    # Same schema (names and Arrow types) as the transformers backend.
    hf = prepared(tiny_config, tiny_prepared)
    run_stage(hf, "generate")
    assert pq.read_schema(out) == pq.read_schema(
        RunStore(hf).stage_dir("generate") / "samples.parquet"
    )
    # vLLM's sampling log-probs are the model's: they match a transformers fp32 forward.
    seqs = [(r["prompt_token_ids"], ids) for r in rows[:4] for ids in r["response_token_ids"]]
    expected = TransformersLogprobs(base_model_dir(cfg))(seqs)
    got = [lps for r in rows[:4] for lps in r["sampling_logprobs"]]
    for g, e in zip(got, expected, strict=True):
        assert g == pytest.approx(e, abs=1e-3)


@pytest.mark.slow
def test_vllm_reference_logps_match_transformers_fp32(vllm_tiny_run: RunConfig) -> None:
    store = RunStore(vllm_tiny_run)
    pairs = read_rows(store.stage_dir("score") / "pairs.parquet")
    assert pairs and store.require("score")["reference_logps"] == "vllm"
    seqs = [
        (p["prompt_token_ids"], p[f"{s}_token_ids"]) for p in pairs for s in ("chosen", "rejected")
    ]
    expected = TransformersLogprobs(base_model_dir(vllm_tiny_run), dtype="float32")(seqs)
    got = [p[f"ref_{s}_logps"] for p in pairs for s in ("chosen", "rejected")]
    worst = max(
        abs(a - b) for g, e in zip(got, expected, strict=True) for a, b in zip(g, e, strict=True)
    )
    assert worst < 1e-3, worst


@pytest.mark.slow
def test_vllm_judge_scores(vllm_tiny_run: RunConfig) -> None:
    """Judge scores are mean win probabilities: in [0, 1], and a prompt's K scores sum to K/2
    (every comparison hands out exactly one win in total)."""
    store = RunStore(vllm_tiny_run)
    scored = read_rows(store.stage_dir("score") / "scored.parquet")
    assert store.require("score")["scorer"].startswith("judge(")
    by_prompt: dict[str, list[float]] = {}
    for r in scored:
        by_prompt.setdefault(r["prompt_id"], []).append(r["reward"])
    for rewards in by_prompt.values():
        assert all(0.0 <= x <= 1.0 for x in rewards)
        assert sum(rewards) == pytest.approx(len(rewards) / 2, abs=1e-6)


def test_corrupt_chunk_in_scratch_is_discarded_and_redone(
    tiny_config: ConfigFactory, tiny_prepared: RunConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kept chunk damaged on disk (not a parquet file any more) is discarded and sampled
    again; the result equals an uninterrupted run's."""
    cfg = prepared(tiny_config, tiny_prepared, "generate.chunk_size=8", "generate.batch_size=4")
    calls: list[int] = []
    real = generation.TransformersSampler.sample

    def failing(self, prompts, seeds, settings):  # type: ignore[no-untyped-def]
        calls.append(len(prompts))
        if calls == [4, 4, 4]:
            raise KeyboardInterrupt  # the first run dies inside the second chunk
        return real(self, prompts, seeds, settings)

    monkeypatch.setattr(generation.TransformersSampler, "sample", failing)
    store = RunStore(cfg)
    with pytest.raises(KeyboardInterrupt):
        run_stage(cfg, "generate")
    (kept,) = store.scratch_dir("generate").glob("*/chunk-00000.parquet")
    kept.write_bytes(kept.read_bytes()[: kept.stat().st_size // 2])
    calls[:] = [0]
    run_stage(cfg, "generate")
    assert calls == [0, 4, 4, 4, 4]  # both chunks sampled: the damaged one was not used
    resumed = store.require("generate")["outputs"]
    monkeypatch.setattr(generation.TransformersSampler, "sample", real)
    run_stage(cfg, "generate", force=True)
    assert store.require("generate")["outputs"] == resumed


def test_allow_pickle_weights_is_honoured_by_generate(
    tiny_config: ConfigFactory, tiny_prepared: RunConfig, tmp_path: Path
) -> None:
    """model.allow_pickle_weights is one opt-in: a pickle-only folder (pytorch_model.bin) that
    prepare accepts with it is sampled from by generate too; without it both refuse."""
    base = Path(RunStore(tiny_prepared).require("prepare")["model_dir"])
    pickled = tmp_path / "pickled"
    shutil.copytree(base, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_causal_lm(base).state_dict(), pickled / "pytorch_model.bin")
    cfg = prepared(tiny_config, tiny_prepared, f"generate.model={pickled}")
    with pytest.raises(ModelError, match="model.allow_pickle_weights=true"):
        run_stage(cfg, "generate")
    cfg = prepared(
        tiny_config,
        tiny_prepared,
        f"generate.model={pickled}",
        "model.allow_pickle_weights=true",
    )
    run_stage(cfg, "generate")
    assert RunStore(cfg).require("generate")["model_dir"] == str(pickled)
