"""Shared fixtures: tiny-preset configs rooted in temp folders, and an in-process stage runner."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.offline import apply_offline_defaults

# Offline defaults for every test (the project's one list), plus vLLM's CPU KV cache size for this
# 2-core test machine (the Makefile sets the same where there is no GPU).
apply_offline_defaults()
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from pipeline.config import RunConfig, load_config  # noqa: E402
from pipeline.runstore import RunStore  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.yaml"
DEMO = REPO / "configs" / "demo.yaml"

ConfigFactory = Callable[..., RunConfig]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model/data cache for the whole session (the tiny model is built once)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def tiny_config(tmp_path: Path, cache_dir: Path) -> ConfigFactory:
    """tiny_config("train.beta=0.2", ...) -> the tiny preset, run root in this test's tmp dir."""

    def make(*overrides: str) -> RunConfig:
        # Test inputs (models, data files) live in the test's tmp dir, outside the run root.
        base = [
            f"root={tmp_path / 'runs'}",
            f"cache_dir={cache_dir}",
            f"allowed_roots=[{tmp_path}]",
        ]
        return load_config(TINY, [*base, *overrides])

    return make


def random_llama(seed: int = 0, attention: str | None = None) -> Any:
    """A 2-layer Llama with random weights (``seed``) over a 50-token vocabulary, in fp32;
    ``attention`` picks the attention implementation (transformers' default when None)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **({"attn_implementation": attention} if attention else {}),
    )
    return LlamaForCausalLM(config)


def command_line(cfg: RunConfig, *overrides: str) -> list[str]:
    """A stage's command-line arguments for run ``cfg`` of the tiny preset (its root and
    cache), then ``overrides``."""
    return ["--config", str(TINY), f"root={cfg.root}", f"cache_dir={cfg.cache_dir}", *overrides]


def torchrun_job(script: Path, args: list[str], timeout: int, nproc: int = 2) -> None:
    """``script`` on ``nproc`` CPU ranks under torchrun (one thread each); fails the test with
    the job's output when it fails."""
    import subprocess
    import sys

    from pipeline.distributed import free_port

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("NPROC", None)
    env.setdefault("DS_ACCELERATOR", "cpu")
    cmd = [
        str(Path(sys.executable).with_name("torchrun")),
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        str(script),
        *args,
    ]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]


def run_stage(cfg: RunConfig, stage: str, force: bool = False) -> None:
    """Run one stage in-process, as `python -m stages.<stage>` would."""
    importlib.import_module(f"stages.{stage}").run(cfg, RunStore(cfg), force)


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> RunConfig:
    """A tiny run whose prepare stage has run: read its outputs, don't write into it."""
    root = tmp_path_factory.mktemp("prepared")
    cfg = load_config(TINY, [f"root={root / 'runs'}", f"cache_dir={cache_dir}"])
    run_stage(cfg, "prepare")
    return cfg


# -- a loopback `mlflow server` (promote's server mode, the SLURM chain) -----------------------


class MlflowServer:
    """`mlflow server` on 127.0.0.1 (sqlite + artifact folder under ``root``); ``stop()`` ends it."""

    def __init__(self, root: Path) -> None:
        import subprocess
        import sys

        from pipeline.distributed import free_port

        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = root / "mlflow-server.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed by stop)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                self.url.rsplit(":", 1)[1],
                "--backend-store-uri",
                f"sqlite:///{root / 'mlflow.db'}",
                "--artifacts-destination",
                str(root / "mlartifacts"),
                "--workers",
                "1",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # No job execution (genai scorers, prompt optimisation): the tests use none, and
            # each server with it leaves a huey store folder in /dev/shm behind.
            env={
                **os.environ,
                "MLFLOW_DISABLE_TELEMETRY": "true",
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            },
        )

    def wait_healthy(self, timeout_s: float = 120.0) -> None:
        """Until /health answers (about 13 s here); fails the test if the server dies first."""
        import time
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited:\n{self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not become healthy in {timeout_s:.0f} s")
            time.sleep(0.5)

    def stop(self) -> None:
        import subprocess

        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
