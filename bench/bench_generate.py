"""Sampling throughput, vLLM against the transformers backend, and the cost of reference log-probs.

    python bench/bench_generate.py                       # SmolLM2-135M, 64 prompts x 4 x 48 tokens
    python bench/bench_generate.py --prompts 16 --max-tokens 16      # quick run

Both backends get the same chat-rendered prompts (the built-in task's training prompts), the same
model folder, dtype and sampling settings (temperature 1, top-p 1, per-prompt seeds); EOS is
ignored so both generate exactly prompts x n x max_tokens tokens. Engine / model start-up is
timed apart from sampling.

Reference log-probs, per 1k tokens (prompt + response tokens processed):
- precompute: the score stage's transformers path (fp32 by default, its default dtype) and the
  vLLM ``prompt_logprobs`` path over pairs built from the vLLM samples, each computed once;
- live: what training pays without precompute, a no-grad reference forward on each micro-batch
  (``--train-batch`` pairs = 2x sequences padded to the longest, full-vocabulary logits, train
  precision), every epoch.
Not a test: the machine is shared, numbers are noisy; the ratios are printed side by side.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from pipeline.offline import apply_offline_defaults  # noqa: E402

apply_offline_defaults()  # no hub, no telemetry (pipeline/offline.env)


def prompts_for(tokenizer, count: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    from pipeline import data, models

    snippets = data.split_snippets(data.load_vader_snippets(), 0)["train"]
    rows = data.vader_prompts(snippets, "Continue this movie review: ", 6, count)
    texts = [models.render_prompt(tokenizer, r["prompt"]) for r in rows]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def time_vllm(model_dir: Path, prompts: list[list[int]], args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from vllm import SamplingParams

    from pipeline.generation import prompt_seed, vllm_engine

    t0 = time.perf_counter()
    llm = vllm_engine(model_dir, dtype=args.dtype, seed=0, kv_cache_gib=args.kv_cache_gib)
    start = time.perf_counter() - t0
    params = [
        SamplingParams(
            n=args.n,
            temperature=1.0,
            max_tokens=args.max_tokens,
            seed=prompt_seed(0, str(i)),
            logprobs=0,
            ignore_eos=True,
        )
        for i in range(len(prompts))
    ]
    requests = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(requests[:2], params[:2], use_tqdm=False)  # warm-up: first-call allocations
    t0 = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    samples = [[list(c.token_ids) for c in o.outputs] for o in outputs]
    return llm, start, seconds, samples


def time_transformers(model_dir: Path, prompts: list[list[int]], args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from pipeline.generation import SamplingSettings, TransformersSampler, prompt_seed

    t0 = time.perf_counter()
    sampler = TransformersSampler(model_dir, dtype=args.dtype)
    # Ignore EOS, as the vLLM run does: both generate the same number of tokens.
    sampler.eos_ids = []
    sampler.model.generation_config.eos_token_id = None
    start = time.perf_counter() - t0
    settings = SamplingSettings(args.n, 1.0, 1.0, args.max_tokens, 0)
    seeds = [prompt_seed(0, str(i)) for i in range(len(prompts))]
    sampler.sample(prompts[:2], seeds[:2], settings)  # warm-up
    t0 = time.perf_counter()
    tokens = 0
    from tqdm import tqdm

    for b in tqdm(range(0, len(prompts), args.batch_size), desc="transformers", unit="batch"):
        out = sampler.sample(
            prompts[b : b + args.batch_size], seeds[b : b + args.batch_size], settings
        )
        tokens += sum(len(c.token_ids) for comps in out for c in comps)
    return start, time.perf_counter() - t0, tokens


def live_reference_seconds(model_dir: Path, seqs, args: argparse.Namespace) -> float:  # type: ignore[no-untyped-def]
    """No-grad reference forward per training micro-batch, full logits + log-softmax gather."""
    import torch

    from pipeline.models import load_causal_lm

    model = load_causal_lm(model_dir, dtype="float32").eval()
    dtype = torch.bfloat16 if args.train_precision == "bf16" else torch.float32
    per_batch = 2 * args.train_batch
    t0 = time.perf_counter()
    for b in range(0, len(seqs), per_batch):
        batch = seqs[b : b + per_batch]
        width = max(len(p) + len(r) for p, r in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, (p, r) in enumerate(batch):
            ids[i, : len(p) + len(r)] = torch.tensor(p + r)
            attn[i, : len(p) + len(r)] = 1
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = model(input_ids=ids, attention_mask=attn).logits
            torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: bundled SmolLM2-135M)")
    ap.add_argument("--cache-dir", default=str(REPO / "runs" / "_cache"))
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per transformers batch")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--ref-dtype", default="float32", choices=["bfloat16", "float32"])
    ap.add_argument("--train-batch", type=int, default=4, help="pairs per training micro-batch")
    ap.add_argument("--train-precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--epochs", type=int, default=2, help="epochs a live reference repeats over")
    ap.add_argument(
        "--kv-cache-gib", type=int, default=int(os.environ.get("VLLM_CPU_KVCACHE_SPACE", 1))
    )
    args = ap.parse_args()

    from pipeline.models import convert_smollm2, load_tokenizer
    from pipeline.reference import TransformersLogprobs, VLLMLogprobs

    model_dir = (
        Path(args.model)
        if args.model
        else convert_smollm2(Path(args.cache_dir) / "models" / "smollm2-135m-instruct")
    )
    tokenizer = load_tokenizer(model_dir)
    prompts = prompts_for(tokenizer, args.prompts)
    expected = len(prompts) * args.n * args.max_tokens
    print(
        f"model {model_dir}\n{len(prompts)} prompts x {args.n} samples x {args.max_tokens} tokens, {args.dtype}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        flush=True,
    )

    from pipeline.generation import release_vllm_engine, vllm_engine

    _, v_start, v_sec, samples = time_vllm(model_dir, prompts, args)
    v_tokens = sum(len(s) for group in samples for s in group)
    release_vllm_engine()  # one model in memory at a time
    h_start, h_sec, h_tokens = time_transformers(model_dir, prompts, args)
    assert v_tokens == h_tokens == expected, (v_tokens, h_tokens, expected)
    v_rate, h_rate = v_tokens / v_sec, h_tokens / h_sec

    # Pairs as the score stage builds them: two samples per prompt.
    seqs = [(p, s) for p, group in zip(prompts, samples, strict=True) for s in group[:2]]
    ref_tokens = sum(len(p) + len(r) for p, r in seqs)
    t0 = time.perf_counter()
    TransformersLogprobs(model_dir, dtype=args.ref_dtype, batch_size=16)(
        seqs, desc="precompute (transformers)"
    )
    pre_hf = time.perf_counter() - t0
    llm = vllm_engine(model_dir, dtype=args.ref_dtype, seed=0, kv_cache_gib=args.kv_cache_gib)
    VLLMLogprobs(llm)(seqs[:2])  # warm-up
    t0 = time.perf_counter()
    VLLMLogprobs(llm)(seqs)
    pre_vllm = time.perf_counter() - t0
    live = live_reference_seconds(model_dir, seqs, args)

    per_k = lambda s: 1000 * s / ref_tokens  # noqa: E731
    print("\n== sampling (same prompts, model, settings; EOS ignored) ==")
    print(f"{'backend':<14}{'start s':>9}{'sample s':>10}{'tokens':>8}{'tokens/s':>10}")
    print(f"{'vllm':<14}{v_start:>9.1f}{v_sec:>10.1f}{v_tokens:>8}{v_rate:>10.1f}")
    print(f"{'transformers':<14}{h_start:>9.1f}{h_sec:>10.1f}{h_tokens:>8}{h_rate:>10.1f}")
    print(f"vLLM / transformers tokens/s: {v_rate / h_rate:.2f}x (target >= 3x)")
    print(f"\n== reference log-probs, {len(seqs)} sequences, {ref_tokens} tokens ==")
    print(f"{'path':<44}{'s / 1k tokens':>14}{'x epochs':>10}")
    print(
        f"{'precompute, transformers ' + args.ref_dtype + ' (once)':<44}{per_k(pre_hf):>14.3f}{per_k(pre_hf):>10.3f}"
    )
    print(
        f"{'precompute, vLLM prompt_logprobs ' + args.ref_dtype + ' (once)':<44}{per_k(pre_vllm):>14.3f}{per_k(pre_vllm):>10.3f}"
    )
    print(
        f"{'live forward in training, ' + args.train_precision + f' x {args.epochs} ep':<44}"
        f"{per_k(live):>14.3f}{per_k(live) * args.epochs:>10.3f}"
    )
    print(
        f"live ({args.epochs} epochs) / transformers precompute: {live * args.epochs / pre_hf:.2f}x"
    )
    print(f"live ({args.epochs} epochs) / vLLM precompute: {live * args.epochs / pre_vllm:.2f}x")


if __name__ == "__main__":
    main()
