"""Peak memory of the chunked token statistics against the naive full-logits path.

    python bench/bench_objectives.py            # TDPO and DPO at vocab 49,152, 2 x 4 x 512 tokens
    python bench/bench_objectives.py --tokens 128 --vocab 8192   # quick run

Each path runs in its own subprocess on identical inputs (same seed): final hidden states of
2 x 4 sequences (4 chosen, 4 rejected) with a 1-token prompt and `--tokens` response tokens,
hidden size 576 (SmolLM2-135M), a policy LM head (trained) and a reference LM head (frozen).
One forward + backward of the objective's loss is measured:

- tdpo: per-token log-probs, reference log-probs and KL(ref || pi) over the full vocabulary, then
  the TDPO loss. Naive: both models' full fp32 logits [8, T, V] (log_softmax, as a careful peer).
- dpo: policy per-token log-probs (reference log-probs precomputed), then the DPO loss.

Peak memory is the rise of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) above its resident set at that moment, measured on the second of two
identical steps (the first makes BLAS workspaces and thread pools resident, as in training; the
gradients are cleared in between), so imports, inputs and one-off runtime buffers are excluded and
both paths are charged for the same things (logits, temporaries, the head's weight gradient). Values of both paths are compared (per-token
statistics, loss, gradients). Not a timed test: times are printed for information.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PAIRS = 4  # 2 x 4 sequences: 4 chosen + 4 rejected
HIDDEN = 576  # SmolLM2-135M


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(
    path: str,
    objective_name: str,
    tokens: int,
    vocab: int,
    chunk_size: int,
    out_dir: Path,
    warmup_tokens: int,
) -> dict[str, float]:
    import torch
    from torch import Tensor

    from pipeline.objectives import PairBatch, make_objective, response_token_stats

    torch.manual_seed(0)
    sequences = 2 * PAIRS
    head = torch.nn.Linear(HIDDEN, vocab, bias=False)
    with torch.no_grad():
        head.weight.mul_(20.0)  # spread-out logits, like a trained LM
    ref_head = torch.nn.Linear(HIDDEN, vocab, bias=False).requires_grad_(False)
    ref_head.weight.data.copy_(head.weight.data + 0.5 * torch.randn(vocab, HIDDEN) / HIDDEN**0.5)
    tdpo = objective_name == "tdpo"
    objective = make_objective(objective_name)

    def inputs(n_tokens: int) -> dict[str, Tensor]:
        length = n_tokens + 1  # a 1-token prompt
        hidden = torch.randn(sequences, length, HIDDEN).requires_grad_()
        mask = torch.ones(sequences, length, dtype=torch.bool)
        mask[:, 0] = False
        return {
            "hidden": hidden,
            "ref_hidden": hidden.detach() + 0.1 * torch.randn(sequences, length, HIDDEN),
            "labels": torch.randint(0, vocab, (sequences, length)),
            "mask": mask,
            "precomputed_ref": -torch.rand(sequences, length) * 10 * mask,  # DPO's reference
        }

    def step(x: dict[str, Tensor]) -> tuple[Tensor, Tensor | None, Tensor]:
        hidden, ref_hidden, labels, mask = x["hidden"], x["ref_hidden"], x["labels"], x["mask"]
        if path == "chunked":
            stats = response_token_stats(
                hidden,
                labels,
                mask,
                head,
                ref_hidden=ref_hidden if tdpo else None,
                ref_lm_head=ref_head if tdpo else None,
                chunk_size=chunk_size,
            )
            logps, ref_logps, kl = stats.logps, stats.ref_logps, stats.kl
        else:  # naive: full [B, T, V] logits of both models
            logps_all = torch.log_softmax(head(hidden)[:, :-1].float(), dim=-1)
            target = labels[:, 1:].unsqueeze(-1)
            pad = torch.zeros(sequences, 1)
            logps = torch.cat([pad, logps_all.gather(-1, target).squeeze(-1)], 1)
            ref_logps = kl = None
            if tdpo:
                with torch.no_grad():
                    ref_logps_all = torch.log_softmax(ref_head(ref_hidden)[:, :-1].float(), -1)
                ref_logps = torch.cat([pad, ref_logps_all.gather(-1, target).squeeze(-1)], 1)
                kl = (ref_logps_all.exp() * (ref_logps_all - logps_all)).sum(-1)
                kl = torch.cat([pad, kl], 1)
        if ref_logps is None:
            ref_logps = x["precomputed_ref"]
        b = PAIRS
        batch = PairBatch(
            logps[:b],
            logps[b:],
            mask[:b],
            mask[b:],
            ref_logps[:b],
            ref_logps[b:],
            None if kl is None else kl[:b],
            None if kl is None else kl[b:],
        )
        loss = objective(batch).loss
        loss.backward()
        return logps.detach(), None if kl is None else kl.detach(), loss.detach()

    # A short unmeasured step first: BLAS workspaces and thread pools are then resident in both
    # paths alike, as in a training loop after its first step.
    step(inputs(warmup_tokens))
    head.weight.grad = None
    measured = inputs(tokens)
    hidden = measured["hidden"]
    exact = _reset_peak()
    baseline = _status_kib("VmRSS")
    start = time.perf_counter()
    logps, kl, loss = step(measured)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save(
        {
            "logps": logps,
            "kl": kl,
            "loss": loss,
            "hidden_grad": hidden.grad,
            "weight_grad_rows": head.weight.grad[:256].clone(),  # type: ignore[index]
            "weight_grad_norm": head.weight.grad.norm(),  # type: ignore[union-attr]
        },
        out_dir / f"{objective_name}-{path}.pt",
    )
    return {"peak_mib": (peak - baseline) / 1024, "seconds": seconds, "exact_peak": exact}


def run_path(
    path: str, objective: str, args: argparse.Namespace, out_dir: Path
) -> dict[str, float]:
    command = [
        sys.executable,
        __file__,
        "--worker",
        path,
        "--objective",
        objective,
        "--tokens",
        str(args.tokens),
        "--vocab",
        str(args.vocab),
        "--chunk-size",
        str(args.chunk_size),
        "--warmup-tokens",
        str(args.warmup_tokens),
        "--out-dir",
        str(out_dir),
    ]
    # Fixed glibc mmap threshold: large buffers are returned to the OS when freed, so the resident
    # set tracks live memory (glibc's adaptive threshold would keep freed chunks resident).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576"}
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{objective}/{path} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def compare(objective: str, out_dir: Path) -> dict[str, float]:
    import torch

    naive = torch.load(out_dir / f"{objective}-naive.pt")
    chunked = torch.load(out_dir / f"{objective}-chunked.pt")
    diffs = {}
    for key in ("logps", "kl", "loss", "hidden_grad", "weight_grad_rows", "weight_grad_norm"):
        if naive[key] is None:
            continue
        a, b = naive[key].double(), chunked[key].double()
        diffs[key] = float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
    return diffs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=512, help="response tokens per sequence")
    parser.add_argument("--vocab", type=int, default=49_152)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--objectives", default="tdpo,dpo")
    parser.add_argument(
        "--warmup-tokens", type=int, default=32, help="tokens of the unmeasured first step"
    )
    parser.add_argument("--worker", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--objective", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(
            args.worker,
            args.objective,
            args.tokens,
            args.vocab,
            args.chunk_size,
            args.out_dir,
            args.warmup_tokens,
        )
        print(json.dumps(result))
        return

    targets = {"tdpo": 0.35, "dpo": 0.5}
    print(
        f"2 x {PAIRS} sequences x {args.tokens} response tokens, vocab {args.vocab}, hidden "
        f"{HIDDEN}, chunk {args.chunk_size}; forward + backward; peak = rise of VmHWM"
    )
    print(
        f"{'objective':<10}{'naive MiB':>11}{'chunked MiB':>13}{'ratio':>8}{'target':>8}"
        f"{'naive s':>9}{'chunked s':>11}  max |naive - chunked| / max |naive|"
    )
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp)
        for objective in args.objectives.split(","):
            naive = run_path("naive", objective, args, out_dir)
            chunked = run_path("chunked", objective, args, out_dir)
            ratio = chunked["peak_mib"] / naive["peak_mib"]
            diffs = compare(objective, out_dir)
            target = targets.get(objective, 1.0)
            failed |= ratio > target
            diff_text = ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
            print(
                f"{objective:<10}{naive['peak_mib']:>11.0f}{chunked['peak_mib']:>13.0f}"
                f"{ratio:>8.3f}{target:>8.2f}{naive['seconds']:>9.1f}{chunked['seconds']:>11.1f}"
                f"  {diff_text}"
            )
    if failed:
        print("ratio above target")
        sys.exit(1)


if __name__ == "__main__":
    main()
