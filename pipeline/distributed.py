"""Processes and process groups: one code path for 1 CPU process, 2 gloo ranks or NCCL clusters.

A stage that trains calls ``launch(...)`` first. Outside a launcher (no ``RANK``/``LOCAL_RANK`` in
the environment) it re-executes the stage under the DeepSpeed launcher (or torchrun) over all
local devices and returns the launcher's exit code; inside one it returns None and the caller
goes on as one rank. Cluster topology comes from the environment, as on SLURM or Kubernetes:

    NPROC        processes per node (default: train.nproc; "auto" = one per local accelerator,
                 or one on a CPU-only machine: ranks there share one RAM and the cores)
    NNODES       number of nodes (default 1); NODE_RANK this node's index (default 0)
    MASTER_ADDR  address of node 0 (default 127.0.0.1); MASTER_PORT (default: a free port on
                 a single node, 29500 across nodes, where every node must agree)
    HOSTFILE     DeepSpeed hostfile: with NODE_RANK unset, node 0 starts every node over ssh
                 (pdsh); without it, every node runs the same command with its own NODE_RANK
    MIDPO_LAUNCHER  "deepspeed" (default) or "torchrun"

What listens where (docs/reliability.md): on one node the ranks meet through a file store in a
private temp folder (``MIDPO_RENDEZVOUS_FILE``, set by ``launch``) and gloo/NCCL connect over
the loopback interface, so nothing listens beyond 127.0.0.1. Across nodes torch's TCPStore
listens on MASTER_PORT on node 0 on every interface (torch has no option to bind it to one);
gloo and NCCL use the interfaces GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME name.

Every rank calls ``init_process_group()`` then, whatever happens, ``teardown()``: a barrier and
``destroy_process_group``; without them gloo sometimes aborts at exit and the launcher reports a
failure for a run that succeeded.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError
from pipeline.console import console

LAUNCHERS = ("deepspeed", "torchrun")
DEFAULT_MULTI_NODE_PORT = 29500


class LaunchError(ConfigError):
    """The launch settings (environment or config) are inconsistent."""


# -- launching ---------------------------------------------------------------------------------


def under_launcher() -> bool:
    """True in a process started by a distributed launcher (it sets RANK and LOCAL_RANK)."""
    return "RANK" in os.environ and "LOCAL_RANK" in os.environ


def accelerator_name() -> str:
    """DeepSpeed's accelerator ("cuda", "cpu", ...): DS_ACCELERATOR or what DeepSpeed detects."""
    from deepspeed.accelerator import get_accelerator

    return str(get_accelerator().device_name())


def local_device_count() -> int:
    """Accelerators on this machine; 0 when DeepSpeed runs on the CPU."""
    if os.environ.get("DS_ACCELERATOR", "").strip() == "cpu" or accelerator_name() == "cpu":
        return 0  # (the environment says so: no need to import DeepSpeed to find out)
    from deepspeed.accelerator import get_accelerator

    return int(get_accelerator().device_count())


def default_nproc() -> int:
    """Processes per node for nproc "auto": one per accelerator; one on a CPU-only node, where a
    single process with every core's threads beats ranks splitting the same cores (measured in
    docs/training.md: faster, and without a second copy of the training state)."""
    devices = local_device_count()
    return devices if devices > 0 else 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env_int(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise LaunchError(f"environment variable {name}={raw!r} is not an integer") from None
    if value < minimum:
        raise LaunchError(f"environment variable {name}={value} must be >= {minimum}")
    return value


@dataclass(frozen=True)
class LaunchPlan:
    """Where the ranks of one run go: nodes x processes per node."""

    nproc: int
    nnodes: int = 1
    node_rank: int | None = 0  # None: one invocation starts every node (hostfile + ssh)
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MULTI_NODE_PORT
    hostfile: str | None = None
    launcher: str = "deepspeed"

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes


def launch_plan(nproc_setting: int | str = "auto") -> LaunchPlan:
    """The plan from the environment (NPROC, NNODES, ...) and the config's ``nproc``."""
    configured = default_nproc() if nproc_setting == "auto" else int(nproc_setting)
    nproc = _env_int("NPROC", configured, 1)
    nnodes = _env_int("NNODES", 1, 1)
    hostfile = os.environ.get("HOSTFILE") or None
    if hostfile and not Path(hostfile).is_file():
        raise LaunchError(f"HOSTFILE={hostfile} does not exist")
    node_rank: int | None = _env_int("NODE_RANK", 0, 0)
    if hostfile and not os.environ.get("NODE_RANK", "").strip():
        node_rank = None  # node 0 starts the others
    if node_rank is not None and node_rank >= nnodes:
        raise LaunchError(f"NODE_RANK={node_rank} must be < NNODES={nnodes}")
    default_port = DEFAULT_MULTI_NODE_PORT if nnodes > 1 or hostfile else free_port()
    master_port = _env_int("MASTER_PORT", default_port, 1)
    master_addr = os.environ.get("MASTER_ADDR", "").strip() or "127.0.0.1"
    if nnodes > 1 and not os.environ.get("MASTER_ADDR", "").strip() and not hostfile:
        raise LaunchError(f"NNODES={nnodes}: set MASTER_ADDR to node 0's address on every node")
    launcher = os.environ.get("MIDPO_LAUNCHER", "deepspeed").strip() or "deepspeed"
    if launcher not in LAUNCHERS:
        raise LaunchError(f"MIDPO_LAUNCHER={launcher!r}: expected one of {', '.join(LAUNCHERS)}")
    if launcher == "torchrun" and node_rank is None:
        raise LaunchError(
            "MIDPO_LAUNCHER=torchrun cannot start remote nodes: set NODE_RANK on each"
        )
    return LaunchPlan(nproc, nnodes, node_rank, master_addr, master_port, hostfile, launcher)


def _bin(name: str) -> str:
    """A console script of this environment (next to the interpreter), else from PATH."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.is_file() else name


def world_info(plan: LaunchPlan) -> dict[str, list[int]]:
    """Hosts and their local ranks, as DeepSpeed's launcher numbers ranks (host order)."""
    if plan.hostfile:
        from deepspeed.launcher.runner import fetch_hostfile

        hosts = fetch_hostfile(plan.hostfile) or {}
        if not hosts:
            raise LaunchError(f"HOSTFILE={plan.hostfile} lists no hosts ('name slots=N' lines)")
        nproc = os.environ.get("NPROC", "").strip()
        return {h: list(range(int(nproc) if nproc else n)) for h, n in hosts.items()}
    names = ["localhost"] if plan.nnodes == 1 else [f"node{i}" for i in range(plan.nnodes)]
    return {name: list(range(plan.nproc)) for name in names}


def launcher_command(plan: LaunchPlan, module: str, args: list[str]) -> list[str]:
    """The command that runs ``python -m module args`` as every rank of this node (or all nodes).

    DeepSpeed: its per-node launcher (``deepspeed.launcher.launch``, what the ``deepspeed``
    command runs on each node) started directly, so that a killed stage takes its ranks with it;
    the ``deepspeed`` command itself only when node 0 must start the other nodes over ssh.
    """
    if plan.launcher == "torchrun":
        return [
            _bin("torchrun"),
            f"--nnodes={plan.nnodes}",
            f"--node_rank={plan.node_rank}",
            f"--nproc_per_node={plan.nproc}",
            f"--master_addr={plan.master_addr}",
            f"--master_port={plan.master_port}",
            "-m",
            module,
            *args,
        ]
    if plan.node_rank is None:  # HOSTFILE without NODE_RANK: fan out over ssh (pdsh)
        assert plan.hostfile is not None
        return [
            _bin("deepspeed"),
            "--hostfile",
            plan.hostfile,
            "--master_addr",
            plan.master_addr,
            "--master_port",
            str(plan.master_port),
            "--no_local_rank",
            "--module",
            module,
            *args,
        ]
    encoded = base64.urlsafe_b64encode(json.dumps(world_info(plan)).encode()).decode()
    return [
        sys.executable,
        "-u",
        "-m",
        "deepspeed.launcher.launch",
        f"--world_info={encoded}",
        f"--node_rank={plan.node_rank}",
        f"--master_addr={plan.master_addr}",
        f"--master_port={plan.master_port}",
        "--no_local_rank",
        "--module",
        module,
        *args,
    ]


def _die_with_parent() -> None:
    """In the child: receive SIGTERM when the parent dies (Linux), so ranks never outlive a
    killed stage and race its rerun for the checkpoint folder."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_launcher(cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Run a launcher command; pass Ctrl-C/TERM on to it; return its exit code."""
    proc = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)

    def forward(signum: int, _frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


RENDEZVOUS_FILE = "MIDPO_RENDEZVOUS_FILE"


def loopback_interface() -> str | None:
    """The name of this machine's loopback interface ("lo" on Linux), if it has one."""
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in names if n == "lo" or n.startswith("lo")), None)


@contextlib.contextmanager
def single_node_rendezvous(plan: LaunchPlan, env: dict[str, str]) -> Any:
    """On one node: the ranks meet through a file store in a fresh private folder (removed
    afterwards) and talk over loopback, so no rank listens on a network interface. Across nodes
    ``env`` is left as it is (TCPStore on MASTER_ADDR:MASTER_PORT)."""
    if plan.nnodes > 1 or plan.hostfile:
        yield
        return
    folder = tempfile.mkdtemp(prefix="midpo-rendezvous-")  # mode 0700: only this user's ranks
    env[RENDEZVOUS_FILE] = str(Path(folder) / "store")
    loopback = loopback_interface()
    if loopback:
        env.setdefault("GLOO_SOCKET_IFNAME", loopback)
        env.setdefault("NCCL_SOCKET_IFNAME", loopback)
    try:
        yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def launch(module: str, args: list[str], plan: LaunchPlan) -> int:
    """Start ``python -m module args`` on every rank of this node; the launcher's exit code."""
    cmd = launcher_command(plan, module, args)
    env = dict(os.environ)
    # The launcher and ranks must import this checkout, whatever the current PYTHONPATH.
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH", "")) if p)
    # DeepSpeed compiles its CPU ops on first use (~30 s each): keep them where the Makefile does.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    where = f"{plan.nnodes} node(s) x {plan.nproc} process(es)"
    if plan.nnodes > 1 or plan.hostfile:
        where += f", node {plan.node_rank}, master {plan.master_addr}:{plan.master_port}"
    print(f"[launch] {plan.launcher}: {where}", file=console, flush=True)
    with single_node_rendezvous(plan, env):
        return run_launcher(cmd, env)


def exit_reason(code: int) -> str:
    """The launcher's exit code in words: a rank killed by a signal shows as 256 - signal (the
    launcher exits with the rank's negative return code) or as 128 + signal (a shell)."""
    for number in (256 - code, code - 128):
        if 0 < number < signal.NSIG and code > 128:
            try:
                name = signal.Signals(number).name
            except ValueError:  # a real-time signal: no name of its own
                name = f"signal {number}"
            hint = " (out of memory, or killed)" if name == "SIGKILL" else ""
            return f"a rank was killed by {name}{hint}; launcher exit code {code}"
    return f"launcher exit code {code}"


# -- inside a rank -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return int(value)
    return default


def ranks_from_env() -> Ranks:
    """Rank, world and node as the DeepSpeed launcher, torchrun or mpirun set them."""
    world = _first_env_int(("WORLD_SIZE",), 1)
    local_world = _first_env_int(("LOCAL_SIZE", "LOCAL_WORLD_SIZE"), world)
    return Ranks(
        rank=_first_env_int(("RANK",), 0),
        world_size=world,
        local_rank=_first_env_int(("LOCAL_RANK",), 0),
        local_world_size=local_world,
        node_rank=_first_env_int(("CROSS_RANK", "GROUP_RANK", "NODE_RANK"), 0),
    )


def init_process_group(timeout_minutes: float = 60.0) -> Ranks:
    """Join the job's process group on the accelerator's backend (gloo on CPU, NCCL on CUDA).

    The timeout covers the longest rank-0-only work between collectives (export, MLflow).
    On CPU, each rank gets its share of the node's cores unless OMP_NUM_THREADS says otherwise.
    """
    import logging
    import warnings

    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    ranks = ranks_from_env()
    # DeepSpeed's per-rank INFO lines (config dumps, timers) and torch's deprecation notices
    # for collectives DeepSpeed calls would drown the one progress bar rank 0 shows.
    logging.getLogger("DeepSpeed").setLevel(
        os.environ.get("MIDPO_DEEPSPEED_LOG_LEVEL", "WARNING").upper()
    )
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        if not os.environ.get("OMP_NUM_THREADS"):
            cores = len(os.sched_getaffinity(0))
            torch.set_num_threads(max(1, cores // max(1, ranks.local_world_size)))
    else:
        accelerator.set_device(ranks.local_rank)
    # One node (launch set a rendezvous file): a file store, nothing listening; else env://.
    store_file = os.environ.get(RENDEZVOUS_FILE)
    rendezvous: dict[str, Any] = (
        {"init_method": f"file://{store_file}", "rank": ranks.rank, "world_size": ranks.world_size}
        if store_file
        else {}
    )
    deepspeed.init_distributed(
        dist_backend=accelerator.communication_backend_name(),
        timeout=_dt.timedelta(minutes=timeout_minutes),
        **rendezvous,
    )
    if accelerator.device_name() == "cpu":
        # DeepSpeed's CPU comm op has each rank create a /dev/shm buffer and map every peer's
        # during init. Once all ranks are past init the names are no longer needed: unlink
        # them now, so a killed job leaks nothing (the mappings live until the process ends).
        import torch.distributed as dist

        dist.barrier()
        _remove_shm_buffer(ranks.rank)
    return ranks


def teardown(clean: bool = True) -> None:
    """Barrier, then destroy the process group (a no-op without one).

    After an error (``clean=False``) there is no barrier: the other ranks may be waiting in a
    different collective; this rank leaves and the launcher stops the rest.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            if clean:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def _remove_shm_buffer(rank: int) -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer (/dev/shm, 66 MB a rank).

    DeepSpeed's CPU comm op creates it per job, named by MASTER_ADDR, MASTER_PORT and rank, and
    never removes it: /dev/shm is memory, and each job would leak it until the machine runs out.
    """
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{addr}_{port}_{rank}"):
        path.unlink(missing_ok=True)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (picklable objects only)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def current_device() -> Any:
    """This rank's device (collectives on NCCL need tensors there, gloo on the CPU)."""
    import torch
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def all_true(flag: bool) -> bool:
    """True only if ``flag`` is True on every rank (one small all-reduce)."""
    import torch
    import torch.distributed as dist

    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=current_device())
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
