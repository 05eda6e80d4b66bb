"""Chunked token statistics through a ZeRO-3-partitioned LM head (2 CPU ranks, gloo).

Peers' fused losses read ``lm_head.weight`` directly and break under ZeRO-3, where every rank holds
an empty weight and a shard. Passing the head module lets DeepSpeed's hooks gather it for every
chunk, forward and backward recompute; values and full gradients must equal a dense computation.
Skipped where DeepSpeed is not installed. Run as a script under torchrun, this file is the worker.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
H, V = 16, 50


@pytest.mark.slow
def test_partitioned_lm_head_under_zero3() -> None:
    pytest.importorskip("deepspeed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(port), __file__,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert output.count("ZERO3-OK") == 2, output[-4000:]


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(H, H)
        self.lm_head = torch.nn.Linear(H, V, bias=False)
        self.ref_head = torch.nn.Linear(H, V, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _worker() -> None:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    from pipeline.objectives import response_token_stats

    deepspeed.init_distributed("gloo")
    torch.manual_seed(0)
    dense = _Tiny()
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = _Tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
        if dist.get_rank() == 0:
            model.load_state_dict(dense.state_dict())
    assert model.lm_head.weight.numel() == 0  # partitioned: nothing to read directly

    torch.manual_seed(1)
    x = torch.randn(2, 9, H)
    labels = torch.randint(0, V, (2, 9))
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[:, 3:8] = True
    hidden = engine(x)
    ref_hidden = hidden.detach() * 0.9
    stats = response_token_stats(
        hidden,
        labels,
        mask,
        model.lm_head,
        ref_hidden=ref_hidden,
        ref_lm_head=model.ref_head,
        chunk_size=3,
    )
    assert stats.kl is not None
    engine.backward(stats.logps.sum() + stats.kl.sum())

    dense_hidden = dense.body(x)
    logps_all = torch.log_softmax(dense.lm_head(dense_hidden)[:, :-1], -1)
    ref_all = torch.log_softmax(dense.ref_head(dense_hidden.detach() * 0.9)[:, :-1], -1)
    logps = logps_all.gather(-1, labels[:, 1:, None]).squeeze(-1) * mask[:, 1:]
    kl = (ref_all.exp() * (ref_all - logps_all)).sum(-1) * mask[:, 1:]
    (logps.sum() + kl.sum()).backward()
    close = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(stats.logps[:, 1:], logps.detach(), **close)
    torch.testing.assert_close(stats.kl[:, 1:], kl.detach(), **close)
    # Both ranks computed the same loss, so the averaged gradient is the dense one.
    torch.testing.assert_close(safe_get_full_grad(model.lm_head.weight), dense.lm_head.weight.grad,
                               **close)  # fmt: skip
    torch.testing.assert_close(safe_get_full_grad(model.body.weight), dense.body.weight.grad,
                               **close)  # fmt: skip
    print(f"rank {dist.get_rank()} ZERO3-OK", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    from pipeline.cli import exit_cleanly

    exit_cleanly(0)


if __name__ == "__main__":
    _worker()
