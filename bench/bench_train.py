"""Train-stage benchmark: our DPO step vs TRL's DPOTrainer, side by side, ratios printed.

    .venv/bin/python bench/bench_train.py [--batch 4] [--prompt 48] [--response 48] [--quick]
        [--workload equal|variable] [--device cpu|cuda]    (GPU: bench/gpu/README in docs/training.md)

Same model (SmolLM2-135M-Instruct), same pairs (identical token ids), same global batch, same
precision, same CPU threads in total. Each configuration runs in fresh processes;
speed comes from the steps after a warm-up step, memory from each process's peak RSS (per rank
and summed over ranks). Measured:

- ours (ZeRO-3 with transformer blocks as leaves, chunked log-probs, length bucketing, each
  prompt computed once for both responses) with precomputed vs live reference, bf16 vs fp32,
  2 processes vs 1, shared prompt vs separate sequences, and ZeRO-2 (``ds_configs/zero2.json``)
  vs ZeRO-3 on 2 processes;
- TRL's DPOTrainer (live reference, its default; installed at bench time into a bench-only
  folder with ``pip install --no-deps --target``, never a project dependency), on 1 process and
  as DDP on 2 processes (gloo; the same global batch and threads as ours on 2 processes);
- model FLOPs utilisation against this machine's measured matmul peak (bf16 and fp32).

Tokens are counted the same way for both trainers: both sequences of every pair, the prompt
twice (the shared-prompt layout does less work for the same tokens; that is its gain). tokens/s:
measured tokens over the sum of the measured steps' times (TRL's step starts after its dataloader
has collated the batch and ends before its logging; ours includes collation and the metrics);
wall: over the time between the ends of the last warm-up step and the last step (everything
each trainer does, the same clock for both). On a GPU both clocks wait for the device's work.

Model FLOPs per token: 6 x params for the policy (forward + backward) + 2 x params for a live
reference forward; recomputation from gradient checkpointing is not counted (MFU convention).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from pipeline.offline import apply_offline_defaults  # noqa: E402

apply_offline_defaults()  # no hub, no telemetry (pipeline/offline.env); the workers run this too
TRL_VERSION = "1.16.0"
WORDS = (
    "the film was a quiet and patient study of grief with moments of real warmth but the "
    "pacing drags in the middle act and the score is loud while the cast does honest work "
    "that the script rarely earns"
).split()


# -- data --------------------------------------------------------------------------------------


def make_texts(tok: Any, n: int, prompt: int, response: int, seed: int = 0) -> list[dict[str, str]]:
    """Text pairs whose prompts and responses are exactly ``prompt`` / ``response`` tokens.

    Built from words that are one token each, so every pair has the same length: tokens per
    step are then the same for both trainers whatever order they draw pairs in (this also
    leaves our length bucketing nothing to gain: a conservative comparison).
    """
    words = [w for w in WORDS if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    rng = random.Random(seed)

    def text(k: int) -> str:
        return "".join(" " + rng.choice(words) for _ in range(k))

    return [
        {
            "prompt": "Review:" + text(prompt - 2),
            "chosen": text(response - 1),
            "rejected": text(response - 1),
        }
        for _ in range(n)
    ]


def make_variable_texts(
    tok: Any, n: int, prompts: tuple[int, int], responses: tuple[int, int], seed: int = 0
) -> list[dict[str, str]]:
    """Text pairs with prompt and response lengths drawn uniformly from the given token ranges
    (each pair's two responses drawn apart): ordinary preference data, where padding is what
    the padded layout computes and packing removes."""
    words = [w for w in WORDS if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    rng = random.Random(seed)

    def text(k: int) -> str:
        return "".join(" " + rng.choice(words) for _ in range(max(1, k)))

    return [
        {
            "prompt": "Review:" + text(rng.randint(*prompts) - 2),
            "chosen": text(rng.randint(*responses) - 1),
            "rejected": text(rng.randint(*responses) - 1),
        }
        for _ in range(n)
    ]


def random_weights(folder: Path, cache: Path) -> Path:
    """``folder`` itself when it holds weights, else a copy with random weights (seed 0)."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if any(folder.glob("*.safetensors")):
        return folder
    out = cache / folder.resolve().name
    if not any(out.glob("*.safetensors")):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)))
        model.save_pretrained(str(out))
        for f in folder.iterdir():
            if f.is_file() and not (out / f.name).exists():
                shutil.copy(f, out / f.name)
    return out


def tokenize_like_trl(tok: Any, rows: list[dict[str, str]]) -> list[dict[str, list[int]]]:
    """Token ids as TRL builds them: prompt, then prompt+completion+EOS split at the common prefix."""
    out = []
    for r in rows:
        prompt = tok(r["prompt"])["input_ids"]
        ids = {}
        for side in ("chosen", "rejected"):
            full = tok(r["prompt"] + r[side] + tok.eos_token)["input_ids"]
            assert full[: len(prompt)] == prompt, "prompt is not a token prefix"
            ids[side] = full[len(prompt) :]
        out.append({"prompt": prompt, **ids})
    return out


def reference_logps(
    model_dir: Path, pairs: list[dict[str, list[int]]], device: str = "cpu"
) -> list[tuple[list[float], list[float]]]:
    """fp32 reference log-probs per response token (what the score stage precomputes)."""
    import torch
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    lm.to(device)
    out = []
    with torch.no_grad():
        for p in pairs:
            sides = []
            for side in ("chosen", "rejected"):
                ids = torch.tensor([p["prompt"] + p[side]], device=device)
                logps = torch.log_softmax(lm(ids).logits[0, :-1].float(), -1)
                n = len(p["prompt"])
                sides.append(logps[n - 1 :].gather(-1, ids[0, n:, None])[:, 0].tolist())
            out.append((sides[0], sides[1]))
    return out


def count_parameters(model_dir: Path) -> int:
    """Distinct parameters (tied embeddings once), from the config on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)))
    return sum(p.numel() for p in model.parameters())


# -- matmul peak -------------------------------------------------------------------------------


def matmul_peak(
    threads: int, n: int = 2048, repeats: int = 5, device: str = "cpu"
) -> dict[str, float]:
    """Best GFLOP/s of an n^3 matmul in bf16 and fp32 (``threads`` threads on CPU; on a GPU
    an 8192^3 one, timed to completion)."""
    import torch

    torch.set_num_threads(threads)
    gpu = device == "cuda"
    n = 8192 if gpu else n
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        a @ b
        best = 0.0
        for _ in range(repeats):
            if gpu:
                torch.cuda.synchronize()
            t = time.perf_counter()
            a @ b
            if gpu:
                torch.cuda.synchronize()
            best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
        out[name] = best
    return out


# -- workers -----------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_gib() -> float | None:
    """Peak GPU memory allocated by this process (None on CPU)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return float(torch.cuda.max_memory_allocated()) / 2**30


def ours_worker(spec: dict[str, Any]) -> None:
    """One rank of our trainer on the bench pairs; rank 0 writes the measurements."""
    import torch

    from pipeline import distributed, training
    from pipeline.cli import exit_cleanly
    from pipeline.config import TrainConfig
    from pipeline.objectives import make_objective

    ranks = distributed.init_process_group(10)
    pairs = spec["pairs"]
    world = ranks.world_size
    # Rows that name no setting get the stage's default ("auto", resolved by training.choose).
    settings = {
        k: spec[k]
        for k in (
            "ds_config",
            "gradient_checkpointing",
            "layout",
            "attention",
            "recompute_logits",
            "compile",
        )
        if k in spec
    }
    tc = TrainConfig(
        objective="dpo",
        beta=0.1,
        learning_rate=1e-6,
        warmup_ratio=0.0,
        max_steps=spec["warmup"] + spec["steps"],
        per_device_batch_size=spec["batch"] // world,
        precision=spec["precision"],
        share_prompt=spec.get("share_prompt", True),
        token_chunk_size=spec.get("token_chunk_size", 1024),
        reference=spec["reference"],
        seed=0,
        **settings,
    )
    data = training.PairData(
        pair_ids=[f"p{i}" for i in range(len(pairs))],
        prompts=[p["prompt"] for p in pairs],
        chosen=[p["chosen"] for p in pairs],
        rejected=[p["rejected"] for p in pairs],
        ref_chosen_logps=[r[0] for r in spec["ref"]],
        ref_rejected_logps=[r[1] for r in spec["ref"]],
    )
    model_dir = Path(spec["model_dir"])
    objective = make_objective("dpo", beta=0.1)
    mode = training.choose_reference(objective, tc, data, True)
    choice = None
    if ranks.is_main:
        choice = training.choose(
            tc,
            model_dir,
            world,
            accelerator=distributed.accelerator_name(),
            live_reference=mode == "live",
            max_length=max(data.lengths),
            local_world_size=ranks.local_world_size,
        )
        print(choice.line, flush=True)
    choice = distributed.broadcast_object(choice)
    plan = training.TrainPlan(
        train=tc,
        data=data,
        policy_dir=model_dir,
        reference_dir=model_dir,
        reference_mode=mode,
        choice=choice,
        ds_config=training.deepspeed_config(choice.ds_config, tc, world, hidden_size=576),
        checkpoint_dir=Path(spec["scratch"]) / f"ckpt-{os.getpid()}",
        output_dir=None,
        world_size=world,
        max_length=4096,
        objective=objective,
        export=False,
        checkpoints=False,
    )
    ends: list[float] = []  # each step's end: after its metrics' read, so the device is done
    plan.log = lambda step, metrics: ends.append(time.perf_counter())
    trainer = training.Trainer(plan, ranks)
    trainer.build()
    if spec.get("profile"):
        result = profiled_fit(trainer, Path(spec["out"]).with_suffix(".profile.txt"))
    else:
        result = trainer.fit()
    warm = result.history[spec["warmup"] :]
    rss = distributed.gather_objects(peak_rss_mb())
    if ranks.is_main:
        Path(spec["out"]).write_text(
            json.dumps(
                {
                    "tokens": len(warm) * spec["batch"] * spec["tokens_per_pair"],
                    "seconds": sum(h["step_time_s"] for h in warm),
                    "wall_seconds": ends[-1] - ends[spec["warmup"] - 1],
                    "peak_rss_mb": sum(rss),
                    "rss_per_rank_mb": rss,
                    "peak_gpu_gib": peak_gpu_gib(),
                    "losses": [h["loss"] for h in result.history],
                    "threads": torch.get_num_threads(),
                    "choice": choice.as_dict(),
                }
            )
        )
    trainer.close()
    distributed.teardown()
    exit_cleanly(0)


def profiled_fit(trainer: Any, out: Path) -> Any:
    """trainer.fit() under torch.profiler: a line of per-step totals (device busy time against
    the wall clock, kernel launches, host syncs and reads: what says whether the step is bound
    by the device or by the host), then the 30 costliest operators (device time first) to
    ``out``; the row's speed is then not comparable (the profiler adds its own cost)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        result = trainer.fit()
    wall = time.perf_counter() - started
    table = prof.key_averages()

    def calls(*names: str) -> int:
        return sum(e.count for e in table if e.key in names)

    steps = max(1, len(result.history))
    device_s = sum(getattr(e, "self_device_time_total", 0.0) for e in table) / 1e6
    head = (
        f"per step, over {steps} profiled steps: wall {wall / steps:.4f} s, device busy "
        f"{device_s / steps:.4f} s, kernel launches {calls('cudaLaunchKernel') / steps:.0f}, "
        f"syncs {calls('cudaStreamSynchronize', 'cudaDeviceSynchronize') / steps:.0f}, host "
        f"reads {calls('aten::_local_scalar_dense') / steps:.0f}, aten ops "
        f"{sum(e.count for e in table if e.key.startswith('aten::')) / steps:.0f}\n"
    )
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    out.write_text(head + table.table(sort_by=key, row_limit=30, max_name_column_width=60))
    return result


def trl_worker(spec: dict[str, Any]) -> None:
    """TRL's DPOTrainer on the same texts (it tokenizes them to the same ids); under torchrun,
    DDP over gloo with the global batch and the threads split between the processes."""
    import torch
    import torch.distributed as dist
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, spec["threads"] // world))
    model_dir = spec["model_dir"]
    cuda = spec.get("device") == "cuda"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    times: list[tuple[float, float]] = []

    def sync() -> None:  # a GPU runs ahead of the host: time finished work only
        if cuda:
            torch.cuda.synchronize()

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            sync()
            self.t = time.perf_counter()  # after its batch is collated (TRL's dataloader)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            sync()
            times.append((self.t, time.perf_counter()))

    # TRL's fused log-prob kernel is Triton, which compiles with a C compiler at first use: on a
    # machine without one, MIDPO_BENCH_TRL_TRITON=0 gives TRL its PyTorch path instead.
    import trl.kernels.chunked_logprob as trl_kernels

    if os.environ.get("MIDPO_BENCH_TRL_TRITON", "1") == "0":
        trl_kernels._TRITON_AVAILABLE = False
    trl_triton = bool(getattr(trl_kernels, "_TRITON_AVAILABLE", False)) and cuda

    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(
            output_dir=out,
            per_device_train_batch_size=spec["batch"] // world,
            ddp_backend=("nccl" if cuda else "gloo") if world > 1 else None,
            gradient_accumulation_steps=1,
            max_steps=spec["warmup"] + spec["steps"],
            learning_rate=1e-6,
            beta=0.1,
            bf16=spec["precision"] == "bf16",
            use_cpu=not cuda,
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            gradient_checkpointing=spec.get("gradient_checkpointing", True),
            gradient_checkpointing_kwargs={"use_reentrant": False},
            max_length=4096,
            dataloader_num_workers=0,
            seed=0,
            lr_scheduler_type="constant",
            warmup_steps=0,
            disable_tqdm=True,
        )
        trainer = DPOTrainer(
            model=model,
            args=args,
            processing_class=tok,
            train_dataset=Dataset.from_list(spec["texts"]),
            callbacks=[Clock()],
        )
        trainer.train()
    warm = times[spec["warmup"] :]
    rss = [peak_rss_mb()]
    if dist.is_initialized():
        rss = [0.0] * world
        dist.all_gather_object(rss, peak_rss_mb())
    if int(os.environ.get("RANK", "0")) == 0:
        Path(spec["out"]).write_text(
            json.dumps(
                {
                    "tokens": len(warm) * spec["batch"] * spec["tokens_per_pair"],
                    "seconds": sum(b - a for a, b in warm),
                    "wall_seconds": times[-1][1] - times[spec["warmup"] - 1][1],
                    "peak_rss_mb": sum(rss),
                    "rss_per_rank_mb": rss,
                    "peak_gpu_gib": peak_gpu_gib(),
                    "threads": torch.get_num_threads(),
                    "trl_triton_log_probs": trl_triton,
                }
            )
        )


# -- driver ------------------------------------------------------------------------------------


def ensure_trl(site: Path) -> Path:
    """A folder holding TRL for the workers (MIDPO_BENCH_SITE: one prepared offline)."""
    if os.environ.get("MIDPO_BENCH_SITE"):
        return Path(os.environ["MIDPO_BENCH_SITE"])
    if not (site / "trl" / "__init__.py").is_file():
        print(f"[bench] installing trl=={TRL_VERSION} into {site} (bench only)", flush=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--target",
                str(site),
                f"trl=={TRL_VERSION}",
            ],
            check=True,
        )
    return site


def run_worker(kind: str, spec: dict[str, Any], nproc: int, extra_path: str = "") -> dict[str, Any]:
    out = Path(spec["scratch"]) / f"{kind}-{spec['name']}.json"
    spec = {**spec, "out": str(out)}
    spec_file = out.with_suffix(".spec.json")
    spec_file.write_text(json.dumps(spec))
    # The repository, then TRL's folder, then what the caller had (an offline kit's site folder).
    paths = (str(REPO), extra_path, os.environ.get("PYTHONPATH", ""))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    if spec.get("device") != "cuda":
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    if kind == "ours" or nproc > 1:
        from pipeline.distributed import free_port

        cmd = [
            str(Path(sys.executable).with_name("torchrun")),
            f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}",
            __file__,
            "--worker",
            kind,
            str(spec_file),
        ]
    else:
        cmd = [sys.executable, __file__, "--worker", "trl", str(spec_file)]
    t = time.time()
    # Its own process group: a row that runs past --row-timeout is killed with its ranks, so
    # no leftover process holds the device while the next row is measured.
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        log, _ = proc.communicate(timeout=spec.get("row_timeout"))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        return {"failed": f"timed out after {spec['row_timeout']} s", "log": log[-3000:]}
    if proc.returncode != 0:
        return {"failed": f"exit {proc.returncode}", "log": log[-3000:]}
    result = dict(json.loads(out.read_text()))
    result["wall_s"] = time.time() - t
    profile = out.with_suffix(".profile.txt")
    if profile.is_file():
        result["profile"] = profile.read_text()
    return result


LEGACY = {"ds_config": "ds_configs/zero3.json", "gradient_checkpointing": True}  # rows before auto
Row = tuple[str, str, dict[str, Any], int]


def cpu_configs(quick: bool) -> list[Row]:
    """The CPU rows: the earlier rows (ZeRO-3 and checkpointing as they were set), the default
    ("auto": what the train stage picks here), TRL with and without checkpointing."""
    configs: list[Row] = [
        (
            "ours",
            "bf16 precomputed ref, 2 procs",
            {"precision": "bf16", "reference": "auto"},
            2,
        ),
        ("ours", "bf16 live ref, 2 procs", {"precision": "bf16", "reference": "live"}, 2),
        (
            "ours",
            "bf16 precomputed ref, ZeRO-2, 2 procs",
            {"precision": "bf16", "reference": "auto", "ds_config": "ds_configs/zero2.json"},
            2,
        ),
        ("ours", "bf16 precomputed ref, 1 proc", {"precision": "bf16", "reference": "auto"}, 1),
        ("ours", "bf16 live ref, 1 proc", {"precision": "bf16", "reference": "live"}, 1),
        (
            "ours",
            "bf16 precomputed ref, 1 proc, separate seqs",
            {"precision": "bf16", "reference": "auto", "share_prompt": False},
            1,
        ),
        ("trl", "TRL DPOTrainer bf16 (live ref)", {"precision": "bf16"}, 1),
        ("trl", "TRL DPOTrainer bf16 (live ref), 2 procs", {"precision": "bf16"}, 2),
    ]
    if not quick:
        configs += [
            (
                "ours",
                "fp32 precomputed ref, 2 procs",
                {"precision": "fp32", "reference": "auto"},
                2,
            ),
            ("ours", "fp32 live ref, 1 proc", {"precision": "fp32", "reference": "live"}, 1),
            ("trl", "TRL DPOTrainer fp32 (live ref)", {"precision": "fp32"}, 1),
        ]
    configs = [(k, n, {**LEGACY, **c} if k == "ours" else c, p) for k, n, c, p in configs]
    return configs + [
        ("ours", "bf16 default, 2 procs", {"precision": "bf16", "reference": "auto"}, 2),
        ("ours", "bf16 default, 1 proc", {"precision": "bf16", "reference": "auto"}, 1),
        (
            "ours",
            "bf16 compiled blocks, 1 proc",
            {"precision": "bf16", "reference": "auto", "compile": True},
            1,
        ),
        (
            "ours",
            "bf16 default but ZeRO-1 (a GPU's choice), 1 proc",
            {"precision": "bf16", "reference": "auto", "ds_config": "ds_configs/zero1.json"},
            1,
        ),
        (
            "ours",
            "bf16 default live ref, 1 proc",
            {"precision": "bf16", "reference": "live"},
            1,
        ),
        (
            "trl",
            "TRL DPOTrainer bf16 (live ref), no checkpointing",
            {"precision": "bf16", "gradient_checkpointing": False},
            1,
        ),
    ]


def gpu_configs() -> list[Row]:
    """The GPU rows of issue 14's table, one process on one GPU, bf16. "default" rows name no
    setting: what ``train.*: auto`` picks on this device (the choice is in the JSON)."""
    bf16 = {"precision": "bf16"}
    live = {**bf16, "reference": "live"}
    flex = {"attention": "flex_attention"}
    # Most telling first: the run's time box may cut the last rows.
    return [
        ("trl", "TRL live ref, no checkpointing", {**bf16, "gradient_checkpointing": False}, 1),
        ("ours", "ours default, precomputed ref", {**bf16, "reference": "auto"}, 1),
        ("ours", "ours default but ZeRO-0 (bf16 on DeepSpeed's fp16 path)", {**bf16, "reference": "auto", "ds_config": "ds_configs/zero0.json"}, 1),
        ("ours", "ours compiled blocks, precomputed ref", {**bf16, "reference": "auto", "compile": True}, 1),
        ("ours", "profile: ours default, live ref", {**live, "profile": True}, 1),
        ("ours", "ours default, live ref", live, 1),
        ("trl", "TRL live ref, checkpointing", bf16, 1),
        ("ours", "ours default, live ref, checkpointing", {**live, "gradient_checkpointing": True}, 1),
        ("ours", "ours live ref, flex packed", {**live, **flex, "layout": "packed"}, 1),
        ("ours", "ours live ref, flex shared prompt", {**live, **flex, "layout": "shared_prompt"}, 1),
        ("ours", "ours live ref, logits kept for backward", {**live, "recompute_logits": False}, 1),
        ("ours", "ours live ref, ZeRO-3 (the old default)", {**live, "ds_config": "ds_configs/zero3.json", "gradient_checkpointing": False}, 1),
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4, help="global batch (pairs per step)")
    ap.add_argument("--prompt", type=int, default=48, help="prompt tokens")
    ap.add_argument("--response", type=int, default=48, help="tokens per response (with EOS)")
    ap.add_argument("--warmup", type=int, default=1, help="steps not measured")
    ap.add_argument("--steps", type=int, default=4, help="steps measured")
    ap.add_argument("--quick", action="store_true", help="bf16 runs only")
    ap.add_argument(
        "--repeats", type=int, default=2, help="runs per configuration (best speed kept)"
    )
    ap.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="cuda: the GPU rows (one GPU)"
    )
    ap.add_argument(
        "--workload",
        choices=("equal", "variable"),
        default="equal",
        help="equal-length pairs, or lengths drawn from --prompt-range / --response-range",
    )
    ap.add_argument("--prompt-range", type=int, nargs=2, default=None, metavar=("MIN", "MAX"))
    ap.add_argument("--response-range", type=int, nargs=2, default=None, metavar=("MIN", "MAX"))
    ap.add_argument("--out", type=Path, default=None, help="JSON results (default: runs/)")
    ap.add_argument("--rows", nargs="+", default=None, help="only rows whose name has one of these")
    ap.add_argument(
        "--row-timeout", type=float, default=None, help="seconds before a row is killed (skipped)"
    )
    ap.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a folder with config and tokenizer (weights random-initialised, seed 0, when it "
        "has none); default: the bundled SmolLM2-135M-Instruct",
    )
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.warmup < 1:
        ap.error("--warmup: at least 1 (the wall clock starts at the end of the last warm-up step)")
    if a.worker:
        spec = json.loads(Path(a.worker[1]).read_text())
        (ours_worker if a.worker[0] == "ours" else trl_worker)(spec)
        return

    from pipeline.models import SMOLLM2, convert_smollm2, load_tokenizer

    cache = Path(os.environ.get("MIDPO_CACHE", REPO / "runs" / "_cache"))
    if a.model is not None:
        model_dir = random_weights(a.model, cache / "bench-models")
    else:
        model_dir = convert_smollm2(cache / "models" / SMOLLM2)
    site = ensure_trl(cache / "bench-site")
    tok = load_tokenizer(model_dir)
    n_pairs = a.batch * (a.warmup + a.steps)
    gpu = a.device == "cuda"
    if a.workload == "equal":
        texts = make_texts(tok, n_pairs, a.prompt, a.response)
    else:
        prompts = tuple(a.prompt_range or ((32, 512) if gpu else (8, 24)))
        responses = tuple(a.response_range or ((32, 1024) if gpu else (32, 64)))
        texts = make_variable_texts(tok, n_pairs, prompts, responses)  # type: ignore[arg-type]
    pairs = tokenize_like_trl(tok, texts)
    sizes = [2 * len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in pairs]
    assert a.workload == "variable" or len(set(sizes)) == 1, "equal pairs differ in length"
    # Both trainers are credited the mean pair size per pair trained (they draw pairs in
    # different orders; over the measured steps the mean is what either computes on average).
    tokens_per_pair = sum(sizes) / len(sizes)
    print(
        f"[bench] SmolLM2-135M on {a.device}, {a.workload} pairs: {tokens_per_pair:.0f} tokens "
        f"per pair on average (prompt twice, both responses; {min(sizes)}-{max(sizes)}), global "
        f"batch {a.batch}, {a.warmup} warm-up + {a.steps} measured steps",
        flush=True,
    )
    ref = reference_logps(model_dir, pairs, "cuda" if gpu else "cpu")
    threads = min(2, len(os.sched_getaffinity(0)))
    peak = matmul_peak(threads, device="cuda" if gpu else "cpu")
    print(
        f"[bench] matmul peak with {threads} threads: bf16 {peak['bf16']:.0f} GFLOP/s, "
        f"fp32 {peak['fp32']:.0f} GFLOP/s",
        flush=True,
    )
    params = count_parameters(model_dir)
    with tempfile.TemporaryDirectory() as scratch:
        base = {
            "model_dir": str(model_dir),
            "pairs": pairs,
            "ref": ref,
            "batch": a.batch,
            "warmup": a.warmup,
            "steps": a.steps,
            "scratch": scratch,
            "texts": texts,
            "tokens_per_pair": tokens_per_pair,
            "threads": threads,
            "device": a.device,
            "row_timeout": a.row_timeout,
        }
        configs = gpu_configs() if gpu else cpu_configs(a.quick)
        if a.rows:
            configs = [c for c in configs if any(part in c[1] for part in a.rows)]
        # Round-robin repeats, best of each: on a shared machine a slow run says more about
        # the neighbours than about the trainer. MFU is against the peak measured just before.
        results: dict[str, dict[str, Any]] = {}
        failed: dict[str, str] = {}
        for _ in range(a.repeats):
            for kind, name, changes, nproc in configs:
                spec = {**base, **changes, "name": name.replace(" ", "_").replace(",", "")}
                run_peak = peak if gpu else matmul_peak(threads)  # the CPU's, for CPU MFU
                r = run_worker(kind, spec, nproc, str(site) if kind == "trl" else "")
                if "failed" in r:
                    failed[name] = r["failed"]
                    print(f"  {name:32s} FAILED ({r['failed']}):\n{r['log']}", flush=True)
                    continue
                if "profile" in r:
                    print(f"  {name}: operators by device time\n{r.pop('profile')}", flush=True)
                r["tokens_per_s"] = r["tokens"] / r["seconds"]
                r["wall_tokens_per_s"] = r["tokens"] / r["wall_seconds"]
                r["rank_rss_mb"] = max(r.get("rss_per_rank_mb", [r["peak_rss_mb"]]))
                live = kind == "trl" or changes.get("reference") == "live"
                flops = (6 + (2 if live else 0)) * params * r["tokens_per_s"] / 1e9
                r["peak_gflops"] = max(run_peak[changes["precision"]], peak[changes["precision"]])
                r["mfu"] = flops / r["peak_gflops"]
                r["load_average"] = os.getloadavg()[0]
                if r.get("peak_gpu_gib") is not None:
                    r["peak_rss_mb"] = r["rank_rss_mb"] = 1024 * r["peak_gpu_gib"]  # GPU memory
                print(
                    f"  {name:32s} {r['tokens_per_s']:6.1f} tokens/s "
                    f"(wall {r['wall_tokens_per_s']:6.1f})  peak RSS "
                    f"{r['peak_rss_mb']:5.0f} MB (largest process {r['rank_rss_mb']:5.0f} MB)  "
                    f"MFU {100 * r['mfu']:4.1f}%  [{r['wall_s']:.0f} s, load {r['load_average']:.1f}]",
                    flush=True,
                )
                best = results.get(name)
                # Speed: the best run; memory: the worst seen over all runs of the configuration.
                worst = {k: max(r[k], (best or r)[k]) for k in ("peak_rss_mb", "rank_rss_mb")}
                if best is None or r["tokens_per_s"] > best["tokens_per_s"]:
                    results[name] = {**r, "runs": (best or {}).get("runs", 0)}
                results[name]["runs"] += 1
                results[name].update(worst)
    report(results)
    out = a.out or REPO / "runs" / f"bench_train_{a.device}_{a.workload}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    out.write_text(
        json.dumps(
            {"peak_gflops": peak, "results": results, "failed": failed, "args": args}, indent=2
        )
    )
    print(f"[bench] results in {out}")
    if failed:
        raise SystemExit(f"[bench] {len(failed)} row(s) failed: {', '.join(failed)}")


def report(results: dict[str, dict[str, Any]]) -> None:
    """Ratios side by side (only for the configurations that ran)."""

    def line(label: str, x: str, y: str, memory: bool = True) -> None:
        if x not in results or y not in results:
            return
        rx, ry = results[x], results[y]
        text = (
            f"  {label:52s} {rx['tokens_per_s'] / ry['tokens_per_s']:5.2f}x tokens/s "
            f"({rx['wall_tokens_per_s'] / ry['wall_tokens_per_s']:4.2f}x wall)"
        )
        if memory:
            text += (
                f", {rx['peak_rss_mb'] / ry['peak_rss_mb']:4.2f}x peak RSS (sum),"
                f" {rx['rank_rss_mb'] / ry['rank_rss_mb']:4.2f}x (largest process)"
            )
        print(text)

    # GPU rows (peak memory: GPU memory allocated, in the RSS columns)
    for ours in [n for n in results if n.startswith("ours")]:
        for trl in ("TRL live ref, no checkpointing", "TRL live ref, checkpointing"):
            line(f"{ours} vs {trl}", ours, trl)
    trl_fast = "TRL DPOTrainer bf16 (live ref), no checkpointing"
    print("\ndefault vs TRL (issue 14's CPU target: >= 1.5x tokens/s, <= 0.8x peak memory)")
    for ours in ("bf16 default, 2 procs", "bf16 default, 1 proc", "bf16 default live ref, 1 proc"):
        line(f"ours {ours} vs TRL bf16 no checkpointing, 1 proc", ours, trl_fast)
    trl16, trl32 = "TRL DPOTrainer bf16 (live ref)", "TRL DPOTrainer fp32 (live ref)"
    trl16_2 = "TRL DPOTrainer bf16 (live ref), 2 procs"
    print("\nratios (targets vs TRL: >= 1.5x tokens/s, <= 0.7x peak memory)")
    for ours in (
        "bf16 precomputed ref, 2 procs",
        "bf16 precomputed ref, ZeRO-2, 2 procs",
        "bf16 live ref, 2 procs",
    ):
        line(f"ours {ours} vs TRL bf16, 2 procs (DDP)", ours, trl16_2)
    for ours in (
        "bf16 precomputed ref, 2 procs",
        "bf16 precomputed ref, ZeRO-2, 2 procs",
        "bf16 live ref, 2 procs",
        "bf16 precomputed ref, 1 proc",
        "bf16 live ref, 1 proc",
    ):
        line(f"ours {ours} vs TRL bf16, 1 proc", ours, trl16)
    line("ours fp32 live ref, 1 proc vs TRL fp32", "fp32 live ref, 1 proc", trl32)
    line(
        "precomputed vs live reference (bf16, 2 procs)",
        "bf16 precomputed ref, 2 procs",
        "bf16 live ref, 2 procs",
    )
    line(
        "precomputed vs live reference (bf16, 1 proc)",
        "bf16 precomputed ref, 1 proc",
        "bf16 live ref, 1 proc",
    )
    line(
        "bf16 vs fp32 (precomputed ref, 2 procs)",
        "bf16 precomputed ref, 2 procs",
        "fp32 precomputed ref, 2 procs",
    )
    line(
        "shared prompt vs separate sequences (bf16, 1 proc)",
        "bf16 precomputed ref, 1 proc",
        "bf16 precomputed ref, 1 proc, separate seqs",
    )
    line(
        "ZeRO-2 vs ZeRO-3 (bf16, precomputed ref, 2 procs)",
        "bf16 precomputed ref, ZeRO-2, 2 procs",
        "bf16 precomputed ref, 2 procs",
    )
    line(
        "ZeRO-3 2 procs vs 1 (bf16, precomputed ref)",
        "bf16 precomputed ref, 2 procs",
        "bf16 precomputed ref, 1 proc",
    )


if __name__ == "__main__":
    main()
