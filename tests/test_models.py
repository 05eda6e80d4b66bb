"""Models: the bundled SmolLM2 conversion is a real, working model; tiny model; safe loading."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from pipeline import models


@pytest.fixture(scope="session")
def smollm2_dir(cache_dir: Path) -> Path:
    return models.resolve_model(models.SMOLLM2, cache_dir)


def test_smollm2_conversion_is_a_working_model(smollm2_dir: Path) -> None:
    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert "quantization_config" not in json.loads((smollm2_dir / "config.json").read_text())
    tok = models.load_tokenizer(smollm2_dir)
    model = models.load_causal_lm(smollm2_dir).eval()
    assert tok.chat_template and sum(p.numel() for p in model.parameters()) == 134_515_008
    # greedy answer to a fixed question
    prompt = models.render_prompt(tok, "What is the capital of France?")
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    # language-model loss on a fixed sentence (a random model would be ~ln(49152) = 10.8)
    text = "The quick brown fox jumps over the lazy dog. It was a sunny day in the park."
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        loss = model(**enc, labels=enc["input_ids"]).loss.item()
    assert 1.5 < loss < 4.5, loss


def test_conversion_is_cached_and_atomic(smollm2_dir: Path, cache_dir: Path) -> None:
    t = time.time()
    assert models.resolve_model(models.SMOLLM2, cache_dir) == smollm2_dir
    assert time.time() - t < 1.0  # second call is a lookup, not a conversion
    leftovers = [p for p in smollm2_dir.parent.iterdir() if ".tmp-" in p.name]
    assert not leftovers


def test_failed_build_leaves_no_folder(tmp_path: Path) -> None:
    def build(tmp: Path) -> None:
        (tmp / "config.json").parent.mkdir(parents=True)
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        models._atomic_folder(tmp_path / "m", build)
    assert list(tmp_path.iterdir()) == []


def test_tiny_model(cache_dir: Path) -> None:
    d = models.resolve_model(models.TINY, cache_dir, texts=lambda: ["a tiny corpus of words"] * 50)
    model = models.load_causal_lm(d)
    n = sum(p.numel() for p in model.parameters())
    assert 50_000 < n < 1_000_000, n
    tok = models.load_tokenizer(d)
    text = models.render_prompt(tok, "hello")
    assert text.startswith("<|im_start|>user\nhello<|im_end|>")


def test_model_folder_errors(tmp_path: Path, cache_dir: Path) -> None:
    with pytest.raises(models.ModelError, match="does not exist"):
        models.resolve_model(str(tmp_path / "nope"), cache_dir)
    bad = tmp_path / "m"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    with pytest.raises(models.ModelError, match="has no tokenizer"):
        models.check_model_folder(bad)
    (bad / "tokenizer.json").write_text("{}")
    (bad / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(models.ModelError, match="only pickle weights"):
        models.check_model_folder(bad)
    models.check_model_folder(bad, allow_pickle=True)
    (bad / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(models.ModelError, match="missing weight shard"):
        models.check_model_folder(bad)


def test_offline_hub_id_fails_at_once(cache_dir: Path) -> None:
    t = time.time()
    with pytest.raises(models.ModelError, match="hub is off"):
        models.resolve_model("HuggingFaceTB/SmolLM2-360M", cache_dir)
    assert time.time() - t < 2.0
