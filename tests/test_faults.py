"""Fault injection: kill -9 a stage at a random point, rerun the same command, and check that the
result equals an uninterrupted run bit for bit and that no partial output was ever complete.

Each case runs the stage once uninterrupted (to learn how long it takes and what it produces),
then in a second run root kills it at a seeded random moment inside that duration, checks that
nothing looks complete, reruns it to completion and compares every output file's sha256.
Evaluate's upstream (prepare -> train) runs once and is copied to the second root. Train has a
kill of one rank here (the launcher must stop the other; the rerun resumes from the checkpoint
with the uninterrupted run's losses); the whole-job train kill (losses within 1e-5) and promotion
(no lost or duplicated registry version) have their own kill tests next to their stages.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import load_config
from pipeline.runstore import RunStore
from tests.conftest import REPO, TINY

# Upstream stages each case needs, in order.
CHAINS = {
    "prepare": [],
    "generate": ["prepare"],
    "score": ["prepare", "generate"],
}


# A tiny run long enough to be interrupted: 13 pairs, 3 epochs of 4 steps, a checkpoint every 2.
TRAIN_ARGS = ["train.epochs=3"]
_LAUNCH_ENV = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "NNODES", "NODE_RANK", "MASTER_ADDR"}
_LAUNCH_ENV |= {"MASTER_PORT", "HOSTFILE", "MIDPO_LAUNCHER"}  # (a rank's or a cluster's)


def _env() -> dict[str, str]:
    """The test's environment for a stage: 2 training ranks on one node, whatever the machine."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV}
    env.update(NPROC="2", PYTHONPATH=str(REPO))
    if not shutil.which("nvidia-smi"):  # as the Makefile: DeepSpeed on the CPU without a GPU
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def _cmd(stage: str, root: Path, cache: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        f"stages.{stage}",
        "--config",
        str(TINY),
        f"root={root}",
        f"cache_dir={cache}",
        *overrides,
    ]


def _run(stage: str, root: Path, cache: Path, *overrides: str) -> float:
    t = time.time()
    done = subprocess.run(
        _cmd(stage, root, cache, *overrides), cwd=REPO, env=_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, f"{stage} failed:\n{done.stderr[-3000:]}"
    return time.time() - t


def _kill_at_random_point(cmd: list[str], duration: float, seed: str) -> bool:
    """Start ``cmd``, SIGKILL its whole process group (the stage and every worker or rank it
    spawned) at a seeded random moment inside ``duration``; False if it had finished first."""
    delay = random.Random(seed).uniform(0.3, 0.9) * duration
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    time.sleep(delay)
    finished_first = proc.poll() is not None  # (rare: the killed run was faster)
    if not finished_first:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return not finished_first


def _outputs(root: Path, stage: str) -> dict[str, str]:
    manifest = json.loads((root / "tiny" / stage / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    return {k: v["sha256"] for k, v in manifest["outputs"].items()}


def _store(root: Path, cache: Path, *overrides: str) -> RunStore:
    return RunStore(load_config(TINY, [f"root={root}", f"cache_dir={cache}", *overrides]))


@pytest.mark.parametrize("stage", list(CHAINS))
def test_kill_minus_9_then_rerun_equals_uninterrupted(
    stage: str, tmp_path: Path, cache_dir: Path
) -> None:
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    for upstream in CHAINS[stage]:
        _run(upstream, clean, cache_dir)
        _run(upstream, killed, cache_dir)
    duration = _run(stage, clean, cache_dir)

    was_killed = _kill_at_random_point(_cmd(stage, killed, cache_dir), duration, f"{stage}-kill")
    if was_killed and _store(killed, cache_dir).complete_manifest(stage) is not None:
        # The kill landed after the stage finished (during process teardown): then what is
        # there must already be the whole, correct output.
        assert _outputs(killed, stage) == _outputs(clean, stage)
    # Otherwise whatever the kill left behind is not complete (complete_manifest is None), and
    # the rerun below must produce the uninterrupted run's output.
    _run(stage, killed, cache_dir)
    assert _outputs(killed, stage) == _outputs(clean, stage)
    leftovers = [p.name for p in (killed / "tiny").iterdir() if p.name.endswith(".partial")]
    assert leftovers == []


# -- evaluate, and one rank of train: on one uninterrupted tiny run up to train ----------------


@pytest.fixture(scope="module")
def trained_root(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """A run root where prepare, generate, score and train ran once, uninterrupted (copy it
    rather than write into it; the evaluate test adds its own clean evaluate here)."""
    root = tmp_path_factory.mktemp("trained") / "runs"
    for stage in ("prepare", "generate", "score", "train"):
        _run(stage, root, cache_dir, *TRAIN_ARGS)
    return root


def _copy_run(src: Path, dest: Path, *without: str) -> None:
    """The run folder with the stages' outputs, without scratch (checkpoints, sample chunks)."""
    shutil.copytree(
        src / "tiny", dest / "tiny", ignore=shutil.ignore_patterns(".*.scratch", *without)
    )


def _evaluate_outputs(root: Path) -> dict[str, str]:
    """Every evaluate output's sha256, except report.json: it has no wall-clock times (a time
    field added there would fail this test), but it records the policy's model_dir, which lies
    under the run root; it is compared as text with the run root taken out."""
    out = _outputs(root, "evaluate")
    out["report.json"] = (root / "tiny" / "evaluate" / "report.json").read_text()
    return {k: v.replace(str(root), "<root>") for k, v in out.items()}


def test_kill_minus_9_evaluate_then_rerun_equals_uninterrupted(
    trained_root: Path, tmp_path: Path
) -> None:
    clean, killed = trained_root, tmp_path / "killed"
    _copy_run(clean, killed, "evaluate")
    # Each root samples the baseline and caches its log-probs in a cache of its own (the models
    # stay where prepare put them): the killed run must redo, not reuse, the clean run's work.
    clean_cache, killed_cache = tmp_path / "clean-cache", tmp_path / "killed-cache"
    duration = _run("evaluate", clean, clean_cache, *TRAIN_ARGS)

    cmd = _cmd("evaluate", killed, killed_cache, *TRAIN_ARGS)
    was_killed = _kill_at_random_point(cmd, duration, "evaluate-kill")
    if was_killed and _store(killed, killed_cache).complete_manifest("evaluate") is not None:
        assert _evaluate_outputs(killed) == _evaluate_outputs(clean)  # killed in teardown
    _run("evaluate", killed, killed_cache, *TRAIN_ARGS)
    assert _evaluate_outputs(killed) == _evaluate_outputs(clean)
    assert set(_evaluate_outputs(killed)) >= {"report.json", "policy_samples.parquet"}
    leftovers = [p.name for p in (killed / "tiny").iterdir() if p.name.startswith(".evaluate")]
    assert leftovers == []  # no partial folder, and the sampling scratch is gone once done


def _rank_processes(launched: int) -> dict[int, Any]:
    """The training ranks started under the stage process ``launched``: {rank: psutil.Process}.

    The stage runs the DeepSpeed launcher, which starts ``python -m stages.train`` once per
    rank with RANK and LOCAL_RANK in its environment.
    """
    import psutil

    ranks = {}
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(launched).children(recursive=True):
            try:
                env, cmdline = child.environ(), child.cmdline()
                parent_env = child.parent().environ()  # (a rank's own workers are not ranks)
            except (psutil.NoSuchProcess, psutil.AccessDenied, AttributeError):
                continue
            if "RANK" in env and "stages.train" in cmdline and "RANK" not in parent_env:
                ranks[int(env["RANK"])] = child
    return ranks


def _metrics(root: Path) -> list[dict[str, float]]:
    lines = (root / "tiny" / "train" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("victim", [1, 0])
def test_kill_one_rank_fails_the_job_then_rerun_resumes(
    victim: int, trained_root: Path, tmp_path: Path, cache_dir: Path
) -> None:
    """SIGKILL one of two ranks mid-training: the job as a whole fails (the launcher stops the
    surviving rank, which would otherwise wait in a collective for the dead one), nothing is
    complete, and rerunning the same command resumes from the last checkpoint with the losses
    of the uninterrupted run."""
    import psutil

    root = tmp_path / "runs"
    _copy_run(trained_root, root, "train", "evaluate")
    store = _store(root, cache_dir, *TRAIN_ARGS)
    cmd = _cmd("train", root, cache_dir, *TRAIN_ARGS)
    scratch = store.scratch_dir("train")

    def latest_step() -> int:
        found = list(scratch.glob("ckpt-*/latest.json"))
        return int(json.loads(found[0].read_text())["step"]) if found else 0

    log = tmp_path / "train.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=_env(),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.time() + 240  # (a hang guard, not a timing assertion)
        ranks: dict[int, Any] = {}
        while time.time() < deadline and proc.poll() is None and len(ranks) < 2:
            ranks = _rank_processes(proc.pid)
            time.sleep(0.02)
        # The 12 steps take about a second: on a busy machine this poll could sleep through
        # them. At the lowest priority the ranks yield the CPU to it whenever it wakes.
        for p in ranks.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                p.nice(19)
        while time.time() < deadline and proc.poll() is None and latest_step() < 2:
            time.sleep(0.02)
        # Freeze both ranks (the kill lands mid-training however fast they run), kill one,
        # and let the other go on: it is the launcher's job to notice and stop it.
        for p in ranks.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                p.suspend()
        assert sorted(ranks) == [0, 1] and proc.poll() is None, log.read_text()[-5000:]
        assert 2 <= latest_step() < 12 and store.complete_manifest("train") is None
        # DeepSpeed's CPU comm op buffers (66 MB of /dev/shm a rank) are unlinked once every
        # rank is past init, so a killed job cannot leak them.
        port = ranks[0].environ()["MASTER_PORT"]
        assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
        ranks[victim].kill()
        ranks[1 - victim].resume()
        code = proc.wait(timeout=180)  # no hang: a surviving rank must not keep the job alive
    finally:
        if proc.poll() is None:  # (the test failed: leave nothing running)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = log.read_text()
    assert code != 0, output[-3000:]
    assert "midpo train: error: training failed (" in output, output[-3000:]
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks.values())
    assert store.complete_manifest("train") is None

    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = store.complete_manifest("train")
    # (the survivor may still have finished marking a checkpoint whose shards were all saved)
    assert manifest is not None and manifest["resumed_from_step"] in range(2, 12, 2)
    assert f"resuming from {scratch}" in done.stderr
    resumed, uninterrupted = _metrics(root), _metrics(trained_root)
    assert [h["step"] for h in resumed] == list(range(1, 13))
    for a, b in zip(resumed, uninterrupted, strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            assert a[key] == pytest.approx(b[key], abs=1e-5, rel=1e-5), (a["step"], key)


# -- what training listens on ------------------------------------------------------------------
def _listening_addresses_of_my_process_group() -> list[str]:
    """Local addresses of the listening TCP sockets of every process in this process group
    (from /proc: each process's socket inodes, matched in /proc/net/tcp and tcp6)."""
    import socket

    group = os.getpgid(0)
    inodes: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.getpgid(int(proc.name)) != group:
                continue
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    link = os.readlink(fd)
                    if link.startswith("socket:["):
                        inodes.add(link[len("socket:[") : -1])
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(fields[1].split(":")[0])
            # The kernel prints each 32-bit word of the address in host (little-endian) order.
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.append(socket.inet_ntop(family, raw))
    return found


def _is_loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def test_single_node_training_listens_only_on_loopback() -> None:
    """Two ranks launched on one node as the train stage launches them: once their process
    group is up, no process of the job (launcher, ranks) listens beyond loopback (torch's
    TCPStore used to listen on every interface, whatever MASTER_ADDR said)."""
    code = (
        "import sys; from pipeline import distributed as d; "
        "sys.exit(d.launch('tests.test_faults', [], d.launch_plan(2)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,  # the job's processes are this group (see the probe below)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [line for line in done.stdout.splitlines() if line.startswith("LISTENING ")]
    assert len(reports) == 1, done.stdout[-3000:]
    addresses = json.loads(reports[0].removeprefix("LISTENING "))
    assert addresses, "the probe saw no listening socket at all (gloo listens on loopback)"
    assert all(_is_loopback(a) for a in addresses), addresses


if __name__ == "__main__":  # a rank of test_single_node_training_listens_only_on_loopback
    import torch.distributed as dist

    from pipeline import distributed

    ranks = distributed.init_process_group(timeout_minutes=2)
    dist.barrier()
    if ranks.rank == 0:
        print("LISTENING " + json.dumps(_listening_addresses_of_my_process_group()), flush=True)
    dist.barrier()
    distributed.teardown()
