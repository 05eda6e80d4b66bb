"""A one-node SLURM cluster on this machine: for the cluster tests and for trying `make submit`.

    python cluster/local_slurm.py up --dir runs/_slurm     # prints `export SLURM_CONF=...`
    python cluster/local_slurm.py down --dir runs/_slurm

Installs SLURM and munge from Debian's packages when missing (needs root: the daemons run as
root, munged as the munge user), writes a slurm.conf for this host alone, and starts munged,
slurmctld and slurmd in the foreground as children it can stop by PID. Everything it owns lives
in its own directory and its own munge socket, key and ports, so it never touches a system
SLURM or munge and two of them can run side by side. Stopping cancels every job first (job
processes outlive slurmd otherwise), then stops slurmd, slurmctld and munged, in that order.

Standard library only: it runs before the project's environment exists.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
PROGRAMS = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "munged")
STATE_FILE = "local_slurm.json"


class SlurmSetupError(RuntimeError):
    """The local SLURM could not be installed or started; the message says which step and why."""


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SlurmSetupError(f"`{' '.join(cmd)}` failed: {e}") from None
    if out.returncode != 0:
        tail = (out.stdout + out.stderr).strip().splitlines()[-15:]
        raise SlurmSetupError(f"`{' '.join(cmd)}` exited {out.returncode}:\n  " + "\n  ".join(tail))
    return out.stdout


def missing_programs() -> list[str]:
    return [p for p in PROGRAMS if shutil.which(p) is None]


def ensure_installed() -> None:
    """apt-get install the SLURM and munge packages unless every program is already there."""
    if not missing_programs():
        return
    if os.geteuid() != 0:
        raise SlurmSetupError(
            f"SLURM programs {missing_programs()} are missing and installing them needs root: "
            f"`apt-get install -y --no-install-recommends {' '.join(PACKAGES)}`"
        )
    if shutil.which("apt-get") is None:
        raise SlurmSetupError(
            f"SLURM programs {missing_programs()} are missing and there is no apt-get"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    policy = _run(["apt-cache", "policy", "slurmctld"], env=env)
    if "Candidate: (none)" in policy or "Candidate:" not in policy:
        _run(["apt-get", "update"], env=env, timeout=600)
    _run(install, env=env, timeout=600)
    if missing_programs():
        raise SlurmSetupError(f"still missing after installing {PACKAGES}: {missing_programs()}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _node_memory_mb() -> int:
    with open("/proc/meminfo") as f:
        total_kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    return max(256, total_kb // 1024 - 512)


def _tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return f"  ({path}: not written)"
    return "\n".join(f"  {line}" for line in text[-lines:])


class LocalSlurm:
    """One-node SLURM rooted in ``workdir``. ``start()``; use ``env`` for clients; ``stop()``."""

    def __init__(self, workdir: str | os.PathLike[str], partition: str = "debug") -> None:
        self.dir = Path(workdir).resolve()
        self.partition = partition
        self.conf = self.dir / "slurm.conf"
        self.hostname = socket.gethostname()
        self.pids: dict[str, int] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self.munge_dir: Path | None = None

    @property
    def env(self) -> dict[str, str]:
        """The environment SLURM clients (sbatch, squeue, ...) need; jobs inherit SLURM_CONF."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- start -------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0, owner_pid: int | None = None) -> None:
        """Start the daemons; with ``owner_pid``, a watchdog stops them if that process dies
        without calling ``stop()`` (a test run killed by a timeout, say)."""
        if os.geteuid() != 0:
            raise SlurmSetupError(
                "a local SLURM runs its daemons as root (SlurmUser=root): run as root"
            )
        ensure_installed()
        try:
            self._start_munged()
            self._write_conf()
            for name in ("slurmctld", "slurmd"):
                self._spawn(name, [name, "-D", "-f", str(self.conf)])
            self._wait_idle(timeout)
            self._save_state()
            if owner_pid is not None:
                self._spawn(
                    "watchdog",
                    [
                        sys.executable,
                        str(Path(__file__).resolve()),
                        "watch",
                        "--dir",
                        str(self.dir),
                        "--pid",
                        str(owner_pid),
                    ],
                )
                self._save_state()
        except BaseException:
            self.stop()
            raise

    def adopt(self, name: str, pid: int) -> None:
        """Stop process ``pid`` with the daemons (and from the watchdog), e.g. an MLflow server."""
        self.pids[name] = pid
        self._save_state()

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.dir / "log" / f"{name}.out", "ab")  # noqa: SIM115 (owned by the child)
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=self.env,
        )
        log.close()
        self._procs[name] = proc
        self.pids[name] = proc.pid

    def _start_munged(self) -> None:
        # munged checks that every directory above its socket and key is reachable by all and
        # writable only by its owner: a private 0755 folder under /tmp (the caller's workdir
        # may sit under a 0700 folder such as pytest's).
        self.dir.mkdir(parents=True, exist_ok=True)
        for sub in ("state", "spool", "log"):
            (self.dir / sub).mkdir(exist_ok=True)
        munge = pwd.getpwnam("munge")
        self.munge_dir = Path(tempfile.mkdtemp(prefix="midpo-munge-"))
        self.munge_dir.chmod(0o755)
        os.chown(self.munge_dir, munge.pw_uid, munge.pw_gid)
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        os.chown(key, munge.pw_uid, munge.pw_gid)
        m = self.munge_dir
        self._spawn(
            "munged",
            [
                # setpriv execs munged, so the PID we keep is munged's own.
                "setpriv",
                "--reuid=munge",
                "--regid=munge",
                "--init-groups",
                "munged",
                "-F",
                f"--socket={m / 'socket'}",
                f"--key-file={key}",
                f"--pid-file={m / 'munged.pid'}",
                f"--log-file={m / 'munged.log'}",
                f"--seed-file={m / 'munged.seed'}",
            ],
        )
        deadline = time.monotonic() + 10
        while not (m / "socket").exists():
            if self._procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise SlurmSetupError(
                    "munged did not start:\n" + _tail(self.dir / "log" / "munged.out")
                )
            time.sleep(0.05)

    def _write_conf(self) -> None:
        assert self.munge_dir is not None
        d, host = self.dir, self.hostname
        lines = [
            "# One-node SLURM written by cluster/local_slurm.py (tests, local trials).",
            "ClusterName=midpo-local",
            f"SlurmctldHost={host}",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire: how long a requeued (preempted) job waits before it may start again
            # (default 120 s).
            f"AuthInfo=socket={self.munge_dir / 'socket'},cred_expire=5",
            f"StateSaveLocation={d / 'state'}",
            f"SlurmdSpoolDir={d / 'spool'}",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}",
            f"SlurmdPidFile={d / 'slurmd.pid'}",
            f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={d / 'log' / 'slurmd.log'}",
            # No systemd and no cgroups here: track job processes through /proc.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "ReturnToService=2",
            "MailProg=/bin/true",
            # Without it a job whose dependency failed stays pending forever.
            "DependencyParameters=kill_invalid_depend",
            # About 1 s per chained step instead of 2-3 s; a requeued job starts again within
            # a second or two of becoming eligible (scheduling passes every second, not 30-60 s).
            "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=1,"
            "bf_interval=1",
            f"NodeName={host} CPUs={os.cpu_count() or 1} RealMemory={_node_memory_mb()} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={host} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise SlurmSetupError(
                        f"{name} exited with code {proc.returncode} while starting:\n"
                        + _tail(self.dir / "log" / f"{name}.out")
                    )
            out = subprocess.run(
                ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env
            )
            state = out.stdout.strip() or out.stderr.strip()
            if out.returncode == 0 and state in ("idle", "mixed", "allocated"):
                return
            time.sleep(0.2)
        raise SlurmSetupError(
            f"the node did not become idle within {timeout:.0f} s (sinfo: {state!r}); "
            f"slurmctld log:\n{_tail(self.dir / 'log' / 'slurmctld.log')}\n"
            f"slurmd log:\n{_tail(self.dir / 'log' / 'slurmd.log')}"
        )

    def _save_state(self) -> None:
        state = {"pids": self.pids, "munge_dir": str(self.munge_dir), "conf": str(self.conf)}
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    # -- stop --------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel every job, then stop slurmd, slurmctld and munged. Safe to call twice."""
        self._terminate("watchdog")
        if self._alive("slurmctld"):
            self._cancel_all_jobs()
        for name in ("slurmd", "slurmctld", "munged", *self.pids):
            self._terminate(name)
        if self.munge_dir is not None:
            shutil.rmtree(self.munge_dir, ignore_errors=True)
            self.munge_dir = None
        (self.dir / STATE_FILE).unlink(missing_ok=True)

    def _alive(self, name: str) -> bool:
        pid = self.pids.get(name)
        if pid is None:
            return False
        if name in self._procs:
            return self._procs[name].poll() is None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def _cancel_all_jobs(self, timeout: float = 20.0) -> None:
        def job_ids() -> list[str]:
            out = subprocess.run(
                ["squeue", "-h", "-o", "%i"],
                capture_output=True,
                text=True,
                env=self.env,
                timeout=10,
            )
            return out.stdout.split() if out.returncode == 0 else []

        try:
            ids = job_ids()
            if ids:
                subprocess.run(["scancel", *ids], capture_output=True, env=self.env, timeout=10)
            deadline = time.monotonic() + timeout
            while ids and time.monotonic() < deadline:  # until no job is left, COMPLETING included
                time.sleep(0.3)
                ids = job_ids()
        except (OSError, subprocess.TimeoutExpired):
            pass  # the controller is unreachable: stopping the daemons is all that is left

    def _terminate(self, name: str, timeout: float = 10.0) -> None:
        pid = self.pids.pop(name, None)
        proc = self._procs.pop(name, None)
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None:
                if proc.poll() is not None:
                    return
            else:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return
            time.sleep(0.1)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        if proc is not None:
            proc.wait(5)

    @classmethod
    def from_state(cls, workdir: str | os.PathLike[str]) -> LocalSlurm:
        """The cluster an earlier `up` started in ``workdir`` (for `down` from another process)."""
        s = cls(workdir)
        path = s.dir / STATE_FILE
        if not path.is_file():
            raise SlurmSetupError(f"no local SLURM was started in {s.dir} ({path} is missing)")
        state = json.loads(path.read_text())
        s.pids = {k: int(v) for k, v in state["pids"].items()}
        s.munge_dir = Path(state["munge_dir"])
        return s

    def __enter__(self) -> LocalSlurm:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def watch(workdir: str, owner_pid: int) -> None:
    """Stop the cluster in ``workdir`` once ``owner_pid`` is gone (or return once it is stopped)."""
    state = Path(workdir) / STATE_FILE
    while state.is_file():
        try:
            os.kill(owner_pid, 0)
        except ProcessLookupError:
            s = LocalSlurm.from_state(workdir)
            s.pids.pop("watchdog", None)  # that is this process
            s.stop()
            print(
                f"local_slurm watchdog: owner {owner_pid} is gone; stopped the cluster",
                file=sys.stderr,
            )
            return
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="cluster/local_slurm.py", description=__doc__.split("\n")[0])
    p.add_argument("command", choices=("up", "down", "watch"))
    p.add_argument("--pid", type=int, help="watch: the owner process")
    p.add_argument("--dir", default="runs/_slurm", help="state, spool, logs (default: %(default)s)")
    p.add_argument("--partition", default="debug")
    args = p.parse_args(argv)
    try:
        if args.command == "up":
            if (Path(args.dir) / STATE_FILE).is_file():
                raise SlurmSetupError(
                    f"a local SLURM already runs from {args.dir}: `down` it first"
                )
            s = LocalSlurm(args.dir, args.partition)
            s.start()
            print(
                f"local SLURM up: partition {s.partition} on {s.hostname}; daemons {s.pids}",
                file=sys.stderr,
            )
            print(f"export SLURM_CONF={s.conf}")
        elif args.command == "watch":
            watch(args.dir, args.pid)
        else:
            LocalSlurm.from_state(args.dir).stop()
            print(f"local SLURM in {args.dir} stopped", file=sys.stderr)
    except SlurmSetupError as e:
        print(f"local_slurm: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
