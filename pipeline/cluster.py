"""SLURM: the pipeline as a chain of batch jobs, one per stage, each on its own resources.

The command line is ``python -m stages.cluster submit|status|wait|cancel`` (``make submit``);
this module is what it calls.

``submit`` checks the config's ``cluster:`` section against the other sections, checks that the
MLflow server answers, asks SLURM whether it would accept each stage's request (``sbatch
--test-only``), then submits ``cluster/slurm/<stage>.sbatch`` per stage, each with
``--dependency=afterok:<previous job>``: a failed stage cancels the rest of the chain. Each
submission gets a folder ``runs/<run>/cluster/<time>/`` with a copy of the config the jobs
read (later edits of the YAML do not change a queued chain), the job logs and
``submission.json`` (job ids, log paths, commands), which ``status``/``wait``/``cancel`` read.

Stages skip themselves when up to date and train resumes from its last checkpoint, so
submitting again after a failure or preemption redoes only what is missing.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import STAGES, ConfigError, RunConfig, load_config
from pipeline.console import console
from pipeline.runstore import RunStore, atomic_write_json

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "cluster" / "slurm"

# Final states of a job that did not succeed (a requeued job goes back to PENDING instead;
# PREEMPTED and NODE_FAIL are passing states for a job SLURM will requeue).
FAILED_STATES = {
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "SPECIAL_EXIT",
    "REVOKED",
}
# Reasons a pending job will never start: waiting on would hang the chain forever.
HOPELESS_REASONS = {
    "DependencyNeverSatisfied",
    "PartitionConfig",
    "PartitionNodeLimit",
    "PartitionTimeLimit",
    "BadConstraints",
    "InvalidAccount",
    "InvalidQOS",
    "AccountNotAllowed",
    "QOSNotAllowed",
    "InactiveLimit",
    "JobHeldAdmin",
}


class ClusterError(RuntimeError):
    """Submitting or running the chain failed; the message names the stage, job, key or log."""


# -- resources ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    """What one stage's job asks SLURM for, and which config key set each value."""

    stage: str
    nodes: int
    gpus_per_node: int
    cpus_per_task: int
    time: str
    partition: str | None = None
    mem: str | None = None
    account: str | None = None
    qos: str | None = None
    keys: dict[str, str] = field(default_factory=dict, compare=False)

    def describe(self) -> str:
        parts = [
            f"nodes={self.nodes}",
            f"gpus_per_node={self.gpus_per_node}",
            f"cpus_per_task={self.cpus_per_task}",
            f"time={self.time}",
        ]
        parts += [
            f"{k}={v}"
            for k in ("partition", "mem", "account", "qos")
            if (v := getattr(self, k)) is not None
        ]
        return ", ".join(parts)


def require_cluster(cfg: RunConfig) -> None:
    if cfg.cluster is None:
        where = cfg.source or "the config"
        raise ConfigError(
            f"{where} has no `cluster:` section, which says what each stage's SLURM job asks "
            "for. Add one (see docs/cluster.md), e.g.\n"
            "  cluster:\n    partition: gpu\n    gpus_per_node: 8\n    time: '04:00:00'\n"
            "    stages:\n      train: {nodes: 2}\n"
            "or pass cluster.* overrides, e.g. cluster.partition=gpu cluster.time=02:00:00"
        )


def stage_resources(cfg: RunConfig, stage: str) -> Resources:
    """The stage's request: ``cluster.stages.<stage>`` over the ``cluster`` defaults."""
    require_cluster(cfg)
    c = cfg.cluster
    assert c is not None
    own = {str(k): v for k, v in c.stages.items()}.get(stage)
    values: dict[str, Any] = {}
    keys: dict[str, str] = {}
    for name in ("partition", "gpus_per_node", "cpus_per_task", "time", "mem"):
        value = getattr(own, name) if own is not None else None
        if value is not None:
            values[name], keys[name] = value, f"cluster.stages.{stage}.{name}"
        else:
            values[name], keys[name] = getattr(c, name), f"cluster.{name}"
    if own is not None and own.nodes is not None:
        values["nodes"], keys["nodes"] = own.nodes, f"cluster.stages.{stage}.nodes"
    elif stage == "train":
        values["nodes"], keys["nodes"] = c.nodes, "cluster.nodes"
    else:
        values["nodes"], keys["nodes"] = 1, f"cluster.stages.{stage}.nodes"
    keys["account"], keys["qos"] = "cluster.account", "cluster.qos"
    return Resources(stage=stage, account=c.account, qos=c.qos, keys=keys, **values)


def check_consistency(cfg: RunConfig, stages: list[str]) -> None:
    """Cross-section checks: what the stages will do must fit in what their jobs ask for."""
    where = cfg.source or "config"
    problems = []
    if "generate" in stages:
        r = stage_resources(cfg, "generate")
        g = cfg.generate
        want = g.tensor_parallel_size * g.data_parallel_size
        if r.gpus_per_node > 0 and want > r.gpus_per_node:
            problems.append(
                f"generate.tensor_parallel_size ({g.tensor_parallel_size}) x data_parallel_size "
                f"({g.data_parallel_size}) = {want} GPUs, but {r.keys['gpus_per_node']} = "
                f"{r.gpus_per_node}: vLLM needs one GPU per worker"
            )
        if r.gpus_per_node == 0 and g.device == "cuda":
            problems.append(
                f"generate.device=cuda but {r.keys['gpus_per_node']} = 0: the job would get no GPU"
            )
    if "train" in stages:
        r = stage_resources(cfg, "train")
        nproc = cfg.train.nproc
        if r.gpus_per_node > 0 and isinstance(nproc, int) and nproc > r.gpus_per_node:
            problems.append(
                f"train.nproc={nproc} processes per node but {r.keys['gpus_per_node']} "
                f"= {r.gpus_per_node}: one GPU per rank"
            )
    if problems:
        raise ConfigError("\n".join(f"{where}: {p}" for p in problems))


def sbatch_args(res: Resources) -> list[str]:
    """The resource flags of a stage's job (one task per node; the stage starts its processes)."""
    args = [
        f"--nodes={res.nodes}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={res.cpus_per_task}",
        f"--time={res.time}",
    ]
    if res.gpus_per_node:
        args.append(f"--gpus-per-node={res.gpus_per_node}")
    for flag in ("partition", "mem", "account", "qos"):
        value = getattr(res, flag)
        if value is not None:
            args.append(f"--{flag}={value}")
    return args


# -- submitting --------------------------------------------------------------------------------


@dataclass
class Job:
    stage: str
    job_id: str
    log: str
    command: list[str]


@dataclass
class Submission:
    run: str
    created: str
    dir: str
    config: str
    overrides: list[str]
    tracking_uri: str
    jobs: list[Job]

    def save(self) -> None:
        atomic_write_json(Path(self.dir) / "submission.json", asdict(self))

    @classmethod
    def load(cls, path: Path) -> Submission:
        data = json.loads(path.read_text())
        data["jobs"] = [Job(**j) for j in data["jobs"]]
        return cls(**data)


def submissions_dir(cfg: RunConfig) -> Path:
    return RunStore(cfg).root.resolve() / "cluster"


def latest_submission(cfg: RunConfig) -> Submission:
    found = sorted(submissions_dir(cfg).glob("*/submission.json"))
    if not found:
        raise ClusterError(
            f"run {cfg.name!r} has no submitted chain under {submissions_dir(cfg)}: "
            "`make submit` first"
        )
    return Submission.load(found[-1])


def _slurm_program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ClusterError(
            f"`{name}` is not on PATH: SLURM's client commands are needed (submit from a login "
            "node, or start a one-node SLURM here with `make slurm-up`)"
        )
    return path


def _slurm(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    except subprocess.TimeoutExpired:
        raise ClusterError(
            f"`{' '.join(cmd[:2])} ...` did not answer within 120 s: is slurmctld up? (`sinfo`)"
        ) from None


def _rejection(res: Resources, error: str, cfg: RunConfig) -> ClusterError:
    """SLURM refused a stage's request: its words, the request, and the keys to change."""
    low = error.lower()
    hints = {
        "partition": ["partition"],
        "node configuration": ["nodes", "cpus_per_task", "gpus_per_node", "mem"],
        "node count": ["nodes"],
        "time limit": ["time"],
        "gres": ["gpus_per_node"],
        "gpu": ["gpus_per_node"],
        "memory": ["mem"],
        "account": ["account"],
        "qos": ["qos"],
        "cpu": ["cpus_per_task"],
    }
    names = list(dict.fromkeys(n for word, ns in hints.items() if word in low for n in ns))
    if res.stage != "train" and res.nodes == 1:
        names = [n for n in names if n != "nodes"]  # one node is all such a stage can ask for
    keys = [f"{res.keys[n]}={getattr(res, n)}" for n in names if getattr(res, n) is not None]
    keys = keys or [f"cluster.stages.{res.stage}.* or cluster.*"]
    return ClusterError(
        f"SLURM rejected the {res.stage} job ({res.describe()}):\n"
        + "".join(f"  {line}\n" for line in error.strip().splitlines())
        + f"check {', '.join(keys)} in {cfg.source or 'the config'}"
        + (" (`sinfo -s` lists partitions and their nodes)" if "partition" in names else "")
    )


def _job_env(cfg: RunConfig, submission_dir: Path) -> dict[str, str]:
    c = cfg.cluster
    assert c is not None
    env = dict(os.environ)  # sbatch exports the submitter's environment (--export=ALL)
    env["MIDPO_REPO"] = str(REPO)
    env["MIDPO_SUBMISSION"] = str(submission_dir)
    # With setup lines (an environment module, a venv) the job's own `python3` is meant.
    if c.python or not c.setup:
        env["MIDPO_PYTHON"] = c.python or sys.executable
    else:
        env.pop("MIDPO_PYTHON", None)
    if c.setup:
        env["MIDPO_SETUP"] = "\n".join(c.setup)
    else:
        env.pop("MIDPO_SETUP", None)
    return env


def submit_chain(
    cfg: RunConfig,
    config_path: str | os.PathLike[str],
    overrides: list[str] | None = None,
    stages: list[str] | None = None,
    force: bool = False,
    echo: bool = True,
) -> Submission:
    """Submit ``stages`` (default: all) as a dependency chain; nothing is left queued on error."""
    from pipeline import tracking

    overrides = list(overrides or [])
    require_cluster(cfg)
    c = cfg.cluster
    assert c is not None
    stages = list(stages or STAGES)
    for s in stages:
        if s not in STAGES:
            raise ConfigError(f"unknown stage {s!r}; stages are {', '.join(STAGES)}")
    stages = [s for s in STAGES if s in stages]  # pipeline order
    check_consistency(cfg, stages)
    sbatch = _slurm_program("sbatch")
    reach = _slurm([_slurm_program("sinfo"), "-h", "-o", "%P"])
    if reach.returncode != 0:
        raise ClusterError(
            "cannot reach SLURM (is slurmctld up, and SLURM_CONF set where the cluster needs it?):\n"
            + "\n".join(f"  {line}" for line in (reach.stderr or reach.stdout).strip().splitlines())
        )
    uri = tracking.tracking_uri(cfg)
    try:
        tracking._check_reachable(uri)
    except tracking.TrackingError as e:
        raise ClusterError(
            f"{e}: every stage logs there; start it or fix tracking.uri / "
            "MLFLOW_TRACKING_URI before submitting"
        ) from None

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = submissions_dir(cfg)
    base.mkdir(parents=True, exist_ok=True)
    sub_dir, n = base / stamp, 1
    while sub_dir.exists():
        n += 1
        sub_dir = base / f"{stamp}-{n}"
    sub_dir.mkdir()
    # The jobs read this copy: editing the YAML later does not change a queued chain.
    config_copy = sub_dir / "config.yaml"
    shutil.copyfile(config_path, config_copy)
    stage_argv = ["--config", str(config_copy), *(["--force"] if force else []), *overrides]
    env = _job_env(cfg, sub_dir)
    common = [
        "--requeue",
        "--open-mode=append",
        "--kill-on-invalid-dep=yes",
        f"--chdir={os.getcwd()}",
        *c.sbatch_args,
    ]
    plans = []
    for s in stages:
        res = stage_resources(cfg, s)
        job_flags = [f"--job-name=midpo.{cfg.name}.{s}", *common, *sbatch_args(res)]
        test = _slurm([sbatch, "--test-only", *job_flags, str(SCRIPTS / f"{s}.sbatch")], env)
        if test.returncode != 0:
            shutil.rmtree(sub_dir, ignore_errors=True)
            raise _rejection(res, test.stderr or test.stdout, cfg)
        plans.append((s, res, job_flags))

    jobs: list[Job] = []
    for s, res, job_flags in plans:
        log = str(sub_dir / f"{s}-%j.out")
        cmd = [sbatch, "--parsable", f"--output={log}", *job_flags]
        if jobs:
            cmd.append(f"--dependency=afterok:{jobs[-1].job_id}")
        cmd += [str(SCRIPTS / f"{s}.sbatch"), *stage_argv]
        out = _slurm(cmd, env)
        if out.returncode != 0:
            if jobs:
                _slurm(["scancel", *(j.job_id for j in jobs)])
            shutil.rmtree(sub_dir, ignore_errors=True)
            raise _rejection(res, out.stderr or out.stdout, cfg)
        job_id = out.stdout.strip().split(";")[0]
        jobs.append(Job(s, job_id, log.replace("%j", job_id), cmd))
        if echo:
            print(f"[submit] {s}: job {job_id} ({res.describe()}) -> {jobs[-1].log}", file=console)
    sub = Submission(
        run=cfg.name,
        created=stamp,
        dir=str(sub_dir),
        config=str(config_copy),
        overrides=overrides,
        tracking_uri=uri,
        jobs=jobs,
    )
    sub.save()
    return sub


# -- following a chain -------------------------------------------------------------------------


@dataclass
class JobInfo:
    job_id: str
    state: str
    reason: str = ""
    exit_code: str = ""
    restarts: int = 0
    nodes: str = ""
    requeue: bool = False

    @property
    def failed(self) -> bool:
        if self.state in ("PREEMPTED", "NODE_FAIL") and self.requeue:
            return False  # SLURM puts it back in the queue; the train stage resumes
        return self.state in FAILED_STATES or self.state == "UNKNOWN"

    @property
    def hopeless(self) -> bool:
        """Pending for a reason that never clears (its dependency failed, a partition limit)."""
        return self.state == "PENDING" and self.reason in HOPELESS_REASONS


def job_info(job_ids: list[str]) -> dict[str, JobInfo]:
    """State of each job the controller still knows (finished jobs stay for MinJobAge)."""
    out = _slurm([_slurm_program("scontrol"), "show", "job", "-o"])
    if out.returncode != 0 and "No jobs in the system" not in out.stderr + out.stdout:
        raise ClusterError(f"`scontrol show job` failed: {(out.stderr or out.stdout).strip()}")
    wanted = set(job_ids)
    found: dict[str, JobInfo] = {}
    for line in out.stdout.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        jid = fields.get("JobId", "")
        if jid in wanted:
            found[jid] = JobInfo(
                jid,
                fields.get("JobState", "UNKNOWN"),
                fields.get("Reason", ""),
                fields.get("ExitCode", ""),
                int(fields.get("Restarts", "0") or 0),
                fields.get("NodeList", ""),
                fields.get("Requeue") == "1",
            )
    return found


def _log_tail(path: str, lines: int = 25) -> str:
    try:
        text = Path(path).read_text(errors="replace").rstrip().splitlines()
    except OSError:
        return "    (no log was written)"
    return "\n".join(f"    {line}" for line in text[-lines:])


def _states(sub: Submission) -> dict[str, JobInfo]:
    infos = job_info([j.job_id for j in sub.jobs])
    for j in sub.jobs:
        if j.job_id not in infos:
            # Purged from the controller (after MinJobAge): its output decides.
            cfg_done = _stage_complete(sub, j.stage)
            infos[j.job_id] = JobInfo(
                j.job_id,
                "COMPLETED" if cfg_done else "UNKNOWN",
                "" if cfg_done else "no longer known to slurmctld",
            )
    return infos


def _stage_complete(sub: Submission, stage: str) -> bool:
    try:
        cfg = load_config(sub.config, sub.overrides)
    except ConfigError:
        return False
    return RunStore(cfg).complete_manifest(stage) is not None


def chain_status(sub: Submission) -> list[tuple[Job, JobInfo]]:
    infos = _states(sub)
    return [(j, infos[j.job_id]) for j in sub.jobs]


def _failure(sub: Submission, rows: list[tuple[Job, JobInfo]]) -> str | None:
    """A report if the chain has failed (a job ended badly or can never start), else None."""
    for i, (job, info) in enumerate(rows):
        if info.failed or info.hopeless:
            later = rows[i + 1 :]
            # Dependents of a failed job: SLURM cancels them (--kill-on-invalid-dep); make sure.
            live = [
                j.job_id
                for j, inf in [(job, info), *later]
                if inf.state in ("PENDING", "RUNNING", "REQUEUED", "SUSPENDED")
            ]
            if live:
                _slurm(["scancel", *live])
            what = f"{info.state}" + (
                f" ({info.reason})" if info.reason not in ("", "None") else ""
            )
            if info.exit_code and info.state != "PENDING":
                what += f", exit code {info.exit_code}"
            lines = [f"stage {job.stage!r} (job {job.job_id}) {what}; log: {job.log}"]
            if info.state != "PENDING":
                lines.append(f"  last lines of the log:\n{_log_tail(job.log)}")
            if later:
                lines.append(
                    "  not run (the chain stops at a failed stage): "
                    + ", ".join(f"{j.stage} (job {j.job_id})" for j, _ in later)
                )
            lines.append(
                "  after fixing it, `make submit` again: finished stages are skipped, "
                "train resumes from its last checkpoint"
            )
            return "\n".join(lines)
    return None


def wait_chain(
    sub: Submission, poll_s: float = 2.0, timeout_s: float | None = None, echo: bool = True
) -> list[tuple[Job, JobInfo]]:
    """Poll until every job of the chain completed; ClusterError on the first failure."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last: dict[str, tuple[str, int]] = {}
    while True:
        rows = chain_status(sub)
        if echo:
            for job, info in rows:
                key = (info.state, info.restarts)
                if last.get(job.job_id) != key:
                    last[job.job_id] = key
                    extra = f" (restart {info.restarts})" if info.restarts else ""
                    print(
                        f"[cluster] {job.stage} (job {job.job_id}): {info.state}{extra}",
                        file=console,
                    )
        report = _failure(sub, rows)
        if report is not None:
            raise ClusterError(report)
        if all(info.state == "COMPLETED" for _, info in rows):
            return rows
        if deadline is not None and time.monotonic() > deadline:
            raise ClusterError(
                f"the chain of run {sub.run!r} is not done after {timeout_s:.0f} s: "
                + ", ".join(f"{j.stage} {i.state}" for j, i in rows)
                + " (jobs left queued; `python -m stages.cluster status` follows them)"
            )
        time.sleep(poll_s)


def cancel_chain(sub: Submission) -> list[str]:
    ids = [j.job_id for j in sub.jobs]
    out = _slurm([_slurm_program("scancel"), *ids])
    if out.returncode != 0:
        raise ClusterError(f"scancel failed: {(out.stderr or out.stdout).strip()}")
    return ids


if __name__ == "__main__":  # `python -m pipeline.cluster`: the command line is stages/cluster.py
    import runpy

    runpy.run_module("stages.cluster", run_name="__main__", alter_sys=True)
