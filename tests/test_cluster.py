"""Cluster operation: the config's cluster section, the sbatch scripts, and the whole chain on a
real one-node SLURM (slurmctld + slurmd + munged from Debian's packages) reporting to a real
`mlflow server`.

The SLURM tests need root (the daemons run as root; packages are installed with apt-get when
missing); without root they are skipped with that reason. A SLURM that cannot start fails them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline import cluster
from pipeline.config import STAGES, ConfigError, RunConfig, load_config
from pipeline.data import read_rows
from pipeline.distributed import free_port
from pipeline.runstore import RunStore
from tests.conftest import MlflowServer

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.yaml"

_spec = importlib.util.spec_from_file_location("local_slurm", REPO / "cluster" / "local_slurm.py")
assert _spec is not None and _spec.loader is not None
local_slurm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local_slurm)


def tiny(*overrides: str) -> RunConfig:
    return load_config(TINY, list(overrides))


# -- config and scripts (no scheduler needed) --------------------------------------------------


def test_stage_resources_take_per_stage_overrides() -> None:
    cfg = tiny(
        "cluster.partition=gpu",
        "cluster.gpus_per_node=8",
        "cluster.nodes=4",
        "cluster.time=04:00:00",
        "cluster.stages.promote.gpus_per_node=0",
        "cluster.stages.promote.partition=cpu",
        "cluster.mem=100G",
        "cluster.account=ml",
    )
    train = cluster.stage_resources(cfg, "train")
    assert (train.nodes, train.gpus_per_node, train.partition) == (4, 8, "gpu")
    assert cluster.sbatch_args(train) == [
        "--nodes=4",
        "--ntasks-per-node=1",
        "--cpus-per-task=2",
        "--time=04:00:00",
        "--gpus-per-node=8",
        "--partition=gpu",
        "--mem=100G",
        "--account=ml",
    ]
    # Only train spans nodes; the others run on one node with the cluster defaults.
    generate = cluster.stage_resources(cfg, "generate")
    assert (generate.nodes, generate.gpus_per_node) == (1, 8)
    promote = cluster.stage_resources(cfg, "promote")
    assert (promote.gpus_per_node, promote.partition) == (0, "cpu")
    assert "--gpus-per-node=0" not in " ".join(cluster.sbatch_args(promote))
    assert promote.keys["partition"] == "cluster.stages.promote.partition"
    assert promote.keys["time"] == "cluster.time"


def test_missing_cluster_section_is_a_clear_error() -> None:
    cfg = tiny()
    with pytest.raises(ConfigError, match=r"configs/tiny.yaml has no `cluster:` section"):
        cluster.stage_resources(cfg, "train")
    with pytest.raises(ConfigError, match="no `cluster:` section"):
        cluster.submit_chain(cfg, TINY, stages=["prepare"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["cluster.stages.generate.nodes=2"],
            "cluster: Value error, stages.generate.nodes=2: only train runs across nodes",
        ),
        (["cluster.stages.trian.nodes=2"], "cluster.stages.trian"),
        (["cluster.time=2h"], "cluster.time: String should match pattern"),
        (
            ["cluster.stages.train.mem=lots"],
            "cluster.stages.train.mem: String should match pattern",
        ),
        (["cluster.nodes=0"], "cluster.nodes: Input should be greater than or equal to 1"),
        (["cluster.sbatch_args=[exclusive]"], "'exclusive' is not an sbatch flag"),
    ],
)
def test_bad_cluster_section_fails_on_load(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        tiny(*overrides)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            [
                "cluster.gpus_per_node=2",
                "generate.tensor_parallel_size=2",
                "generate.data_parallel_size=2",
            ],
            "generate.tensor_parallel_size (2) x data_parallel_size (2) = 4 GPUs, but "
            "cluster.gpus_per_node = 2",
        ),
        (
            ["cluster.gpus_per_node=0", "generate.device=cuda"],
            "generate.device=cuda but cluster.gpus_per_node = 0",
        ),
        (
            ["cluster.gpus_per_node=4", "cluster.stages.train.gpus_per_node=2", "train.nproc=4"],
            "train.nproc=4 processes per node but cluster.stages.train.gpus_per_node = 2",
        ),
    ],
)
def test_inconsistent_sections_are_refused(overrides: list[str], message: str) -> None:
    cfg = tiny(*overrides)
    with pytest.raises(ConfigError) as e:
        cluster.check_consistency(cfg, list(STAGES))
    assert message in str(e.value)


def test_example_config_plans_every_stage() -> None:
    cfg = load_config(REPO / "cluster" / "example.yaml")
    cluster.check_consistency(cfg, list(STAGES))
    train = cluster.stage_resources(cfg, "train")
    assert train.nodes == 2 and cluster.stage_resources(cfg, "generate").nodes == 1


def test_one_batch_script_per_stage_and_valid_shell() -> None:
    for stage in STAGES:
        script = cluster.SCRIPTS / f"{stage}.sbatch"
        text = script.read_text()
        assert text.startswith("#!/bin/bash\n#SBATCH"), script
        assert "cluster/slurm/common.sh" in text
        subprocess.run(["bash", "-n", str(script)], check=True)
    subprocess.run(["bash", "-n", str(cluster.SCRIPTS / "common.sh")], check=True)
    # Training: one srun task per node, node rank from SLURM, launcher per node.
    train = (cluster.SCRIPTS / "train.sbatch").read_text()
    assert 'srun --ntasks="$NNODES" --ntasks-per-node=1' in train
    assert "NODE_RANK=$SLURM_NODEID" in train and "scontrol show hostnames" in train


def test_train_script_maps_the_allocation_to_one_launcher_per_node(tmp_path: Path) -> None:
    """train.sbatch on a 2-node, 4-GPU allocation, with stand-ins for scontrol, srun and python:
    one task per node, each with its node rank and the same master address and port."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {
        "scontrol": 'printf "gpu-a01\\ngpu-a02\\n"',
        # Run the command once per task, as srun does, with that task's SLURM_NODEID.
        "srun": 'echo "srun $*" >> "$FAKE_LOG"\n'
        "n=1; while [[ $1 == --* ]]; do [[ $1 == --ntasks=* ]] && n=${1#--ntasks=}; shift; done\n"
        'for ((i = 0; i < n; i++)); do SLURM_NODEID=$i "$@"; done',
        "fakepython": 'echo "rank=$NODE_RANK nnodes=$NNODES master=$MASTER_ADDR:$MASTER_PORT '
        "nproc=$NPROC ds=${DS_ACCELERATOR-unset} setup=${FROM_SETUP-no} "
        'hostfile=${HOSTFILE-unset} args=$*" >> "$FAKE_LOG"',
    }
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_LOG": str(log),
        "SLURM_JOB_NODELIST": "gpu-a[01-02]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "midpo.x.train",
        "SLURM_CPUS_PER_TASK": "16",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "MIDPO_REPO": str(REPO),
        "MIDPO_PYTHON": str(bin_dir / "fakepython"),
        "MIDPO_SETUP": "export FROM_SETUP=yes",
        "DS_ACCELERATOR": "cpu",
        "HOSTFILE": "/etc/stale-hostfile",
    }
    subprocess.run(
        ["bash", str(cluster.SCRIPTS / "train.sbatch"), "--config", "c.yaml", "train.beta=0.2"],
        env=env,
        check=True,
        capture_output=True,
    )
    calls = log.read_text().splitlines()
    assert calls[0] == (
        "srun --ntasks=2 --ntasks-per-node=1 --cpus-per-task=16 "
        "--kill-on-bad-exit=1 bash -c export NODE_RANK=$SLURM_NODEID; "
        'exec "$0" -m stages.train "$@" ' + env["MIDPO_PYTHON"] + " --config c.yaml train.beta=0.2"
    )
    common = (
        "nnodes=2 master=gpu-a01:24242 nproc=4 ds=unset setup=yes hostfile=unset "
        "args=-m stages.train --config c.yaml train.beta=0.2"
    )
    assert calls[1:] == [f"rank=0 {common}", f"rank=1 {common}"]


def test_submit_without_slurm_tools_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere
    cfg = tiny(f"root={tmp_path}", "cluster.time=00:05:00")
    with pytest.raises(cluster.ClusterError, match="`sbatch` is not on PATH"):
        cluster.submit_chain(
            cfg, TINY, [f"root={tmp_path}", "cluster.time=00:05:00"], stages=["prepare"]
        )


# -- a real SLURM and a real MLflow server -----------------------------------------------------


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A one-node SLURM and an `mlflow server` (sqlite + artifact root), both stopped at the end.

    The server starts first and warms up (~13 s) while SLURM comes up (~2 s).
    """
    if os.geteuid() != 0:
        pytest.skip("a local SLURM runs slurmctld/slurmd as root: run the tests as root")
    root = tmp_path_factory.mktemp("cluster")
    server = MlflowServer(root)  # warms up while SLURM starts
    url = server.url
    slurm = local_slurm.LocalSlurm(root / "slurm")
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "MLFLOW_TRACKING_URI")}
    try:
        try:
            # The watchdog stops everything should this test process die without finalizers.
            slurm.start(owner_pid=os.getpid())
        except local_slurm.SlurmSetupError as e:
            pytest.fail(f"the local SLURM did not start: {e}")
        slurm.adopt("mlflow-server", server.proc.pid)
        server.wait_healthy(120)
        # Clients need SLURM_CONF; jobs inherit it and MLFLOW_TRACKING_URI (sbatch --export=ALL).
        os.environ["SLURM_CONF"] = str(slurm.conf)
        os.environ["MLFLOW_TRACKING_URI"] = url
        yield {"mlflow": url, "slurm_conf": str(slurm.conf), "root": str(root)}
    finally:
        slurm.stop()  # jobs, slurmd, slurmctld, munged, then the server
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def chain_stages() -> list[str]:
    """The whole chain: all six stages."""
    return list(STAGES)


def _preempt_after_first_checkpoint(sub: cluster.Submission, cfg: RunConfig) -> int:
    """Requeue the train job (as preemption does) once it has saved a checkpoint; its step."""
    train = next(j for j in sub.jobs if j.stage == "train")
    scratch = RunStore(cfg).scratch_dir("train")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        for latest in scratch.glob("ckpt-*/latest.json"):
            step = int(json.loads(latest.read_text())["step"])
            subprocess.run(["scontrol", "requeue", train.job_id], check=True, capture_output=True)
            return step
        if any(i.failed or i.hopeless for _, i in cluster.chain_status(sub)):
            return -1  # wait_chain reports it
        time.sleep(0.1)
    raise AssertionError("train saved no checkpoint within 600 s")


@pytest.fixture(scope="module")
def chain(local_cluster: dict[str, str], cache_dir: Path) -> dict[str, Any]:
    """The tiny preset submitted as chained jobs and followed to the end; the train job is
    requeued (preempted) once, after its first checkpoint."""
    overrides = [
        f"root={Path(local_cluster['root']) / 'runs'}",
        f"cache_dir={cache_dir}",
        "name=slurm-chain",
        "cluster.time=00:15:00",
        f"cluster.cpus_per_task={os.cpu_count() or 1}",
        # 24 steps with a checkpoint every 2: time to preempt it mid-training.
        "train.epochs=8",
        "train.checkpoint_every=2",
        "train.nproc=2",  # two ranks in one job (a CPU node's default is one)
    ]
    cfg = load_config(TINY, overrides)
    started = time.monotonic()
    sub = cluster.submit_chain(cfg, TINY, overrides, stages=chain_stages())
    preempted_at = _preempt_after_first_checkpoint(sub, cfg) if "train" in sub_stages(sub) else 0
    try:
        rows = cluster.wait_chain(sub, poll_s=1.0, timeout_s=900)
    except cluster.ClusterError as e:
        pytest.fail(f"the chain failed on SLURM:\n{e}")
    return {
        "cfg": cfg,
        "overrides": overrides,
        "submission": sub,
        "rows": rows,
        "preempted_at": preempted_at,
        "seconds": time.monotonic() - started,
    }


def sub_stages(sub: cluster.Submission) -> list[str]:
    return [j.stage for j in sub.jobs]


def _squeue_ids() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_chain_runs_every_stage_as_its_own_job(chain: dict[str, Any]) -> None:
    cfg, sub, rows = chain["cfg"], chain["submission"], chain["rows"]
    stages = chain_stages()
    assert [j.stage for j in sub.jobs] == stages
    assert len({j.job_id for j in sub.jobs}) == len(stages)
    store = RunStore(cfg)
    for job, info in rows:
        assert info.state == "COMPLETED" and info.exit_code == "0:0", (job.stage, info)
        assert info.restarts == (1 if job.stage == "train" else 0), (job.stage, info)
        manifest = store.complete_manifest(job.stage)
        assert manifest is not None, f"{job.stage}: no complete output"
        log = Path(job.log).read_text()
        assert f"job {job.job_id} (midpo.slurm-chain.{job.stage})" in log
    # Each job after the first waited for the one before it (afterok).
    for before, after in zip(sub.jobs, sub.jobs[1:], strict=False):
        assert f"--dependency=afterok:{before.job_id}" in after.command
    assert "--dependency" not in " ".join(sub.jobs[0].command)
    assert json.loads((Path(sub.dir) / "submission.json").read_text())["run"] == "slurm-chain"
    if "train" in stages:
        train_log = Path(next(j.log for j in sub.jobs if j.stage == "train")).read_text()
        # srun task -> per-node DeepSpeed launcher -> 2 CPU ranks on gloo.
        assert "[launch] deepspeed: 1 node(s) x 2 process(es)" in train_log
        assert (store.stage_dir("train") / "model").is_dir()
    if "evaluate" in stages:
        assert (store.stage_dir("evaluate") / "report.json").is_file()
    if "promote" in stages:
        assert (store.stage_dir("promote") / "promotion.json").is_file()
    print(f"\nchain of {len(stages)} jobs ({', '.join(stages)}) took {chain['seconds']:.0f} s")


def test_preempted_train_job_resumes_from_its_checkpoint(chain: dict[str, Any]) -> None:
    if "train" not in chain_stages():
        pytest.skip("no train stage yet")
    cfg, sub = chain["cfg"], chain["submission"]
    assert chain["preempted_at"] >= 2, "the train job was not preempted mid-training"
    log = Path(next(j.log for j in sub.jobs if j.stage == "train")).read_text()
    job_id = next(j.job_id for j in sub.jobs if j.stage == "train")
    assert "CANCELLED AT" in log and "DUE TO JOB REQUEUE" in log
    assert f"job {job_id} (midpo.slurm-chain.train) on" in log and "restart 1," in log
    manifest = RunStore(cfg).complete_manifest("train")
    assert manifest is not None
    # It went on from the checkpoint it had (or a later one), not from step 0.
    assert manifest["resumed_from_step"] >= chain["preempted_at"], manifest["resumed_from_step"]
    # ... and finished the whole schedule: epochs x ceil(pairs / global batch) optimizer steps
    # (2 ranks here), the same count an uninterrupted run takes.
    pairs = len(read_rows(RunStore(cfg).stage_dir("score") / "pairs.parquet"))
    global_batch = cfg.train.per_device_batch_size * 2 * cfg.train.gradient_accumulation_steps
    assert manifest["steps"] == cfg.train.epochs * -(-pairs // global_batch), (pairs, manifest)


def test_every_stage_logged_once_to_the_shared_server(
    chain: dict[str, Any], local_cluster: dict[str, str]
) -> None:
    from mlflow import MlflowClient

    cfg = chain["cfg"]
    client = MlflowClient(tracking_uri=local_cluster["mlflow"])
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], "tags.`midpo.run` = 'slurm-chain'")
    parents = [r for r in runs if r.data.tags.get("midpo.role") == "pipeline"]
    assert len(parents) == 1, "one parent run per pipeline run"
    parent = parents[0].info.run_id
    parent_file = json.loads((RunStore(cfg).root / "mlflow_parent.json").read_text())
    assert parent_file == {
        "run_id": parent,
        "tracking_uri": local_cluster["mlflow"],
        "experiment": cfg.tracking.experiment,
    }
    children = [r for r in runs if r.info.run_id != parent]
    assert all(r.data.tags.get("mlflow.parentRunId") == parent for r in children)
    finished = [r.data.tags["midpo.stage"] for r in children if r.info.status == "FINISHED"]
    # Rank 0 only: each stage that logs has exactly one finished run under the parent; the one
    # other run is the preempted train attempt, killed before it could end.
    assert len(finished) == len(set(finished)), finished
    unfinished = [r.data.tags["midpo.stage"] for r in children if r.info.status != "FINISHED"]
    assert unfinished in ([], ["train"]), unfinished
    logged = finished
    expected = {"generate", "score", "train", "evaluate", "promote"} & set(chain_stages())
    assert expected <= set(logged), (expected, logged)
    if "train" in logged:
        train = next(r for r in children if r.data.tags["midpo.stage"] == "train")
        assert train.data.metrics, "train logged no metrics to the server"


def test_failed_stage_stops_the_chain_and_names_its_log(
    chain: dict[str, Any], tmp_path: Path
) -> None:
    stages = chain_stages()
    assert "generate" in stages
    cfg0 = chain["cfg"]
    store = RunStore(cfg0)
    later = stages[stages.index("generate") + 1 :]
    before = {s: (store.stage_dir(s) / "manifest.json").stat().st_mtime_ns for s in later}
    # Same run: prepare is up to date (skips), generate fails on a model folder that is missing.
    overrides = [
        *chain["overrides"],
        f"allowed_roots=[{tmp_path}]",
        f"generate.model={tmp_path / 'no-such-model'}",
    ]
    cfg = load_config(TINY, overrides)
    sub = cluster.submit_chain(cfg, TINY, overrides, stages=stages, echo=False)
    with pytest.raises(cluster.ClusterError) as e:
        cluster.wait_chain(sub, poll_s=1.0, timeout_s=600, echo=False)
    report = str(e.value)
    gen = next(j for j in sub.jobs if j.stage == "generate")
    assert f"stage 'generate' (job {gen.job_id}) FAILED (NonZeroExitCode), exit code 2:0" in report
    assert f"log: {gen.log}" in report
    assert "midpo generate: error:" in report and "no-such-model" in report  # the log's tail
    assert (
        "not run (the chain stops at a failed stage): "
        + ", ".join(f"{j.stage} (job {j.job_id})" for j in sub.jobs[stages.index("generate") + 1 :])
        in report
    )
    states = {j.stage: i for j, i in cluster.chain_status(sub)}
    assert states["prepare"].state == "COMPLETED"
    for s in later:
        assert states[s].state == "CANCELLED", (s, states[s])
        # SLURM cancels it (--kill-on-invalid-dep) or wait_chain does, whichever comes first.
        assert states[s].reason in ("DependencyNeverSatisfied", "Dependency"), states[s]
        # It never ran: its output is untouched and its log was never written.
        assert (store.stage_dir(s) / "manifest.json").stat().st_mtime_ns == before[s]
        assert not Path(next(j.log for j in sub.jobs if j.stage == s)).exists()
    assert not set(_squeue_ids()) & {j.job_id for j in sub.jobs}


@pytest.mark.parametrize(
    "override, slurm_says, key",
    [
        (
            "cluster.partition=nosuch",
            "Invalid partition name specified",
            "cluster.partition=nosuch",
        ),
        (
            "cluster.stages.score.cpus_per_task=512",
            "Requested node configuration is not available",
            "cluster.stages.score.cpus_per_task=512",
        ),
    ],
)
def test_request_slurm_rejects_is_reported_and_nothing_queued(
    local_cluster: dict[str, str], tmp_path: Path, override: str, slurm_says: str, key: str
) -> None:
    overrides = [f"root={tmp_path}", "name=rejected", "cluster.time=00:05:00", override]
    cfg = load_config(TINY, overrides)
    queued = set(_squeue_ids())
    with pytest.raises(cluster.ClusterError) as e:
        cluster.submit_chain(cfg, TINY, overrides, stages=list(STAGES), echo=False)
    message = str(e.value)
    assert "SLURM rejected the " in message and slurm_says in message and key in message
    assert set(_squeue_ids()) == queued  # nothing of the chain left queued
    assert not list((tmp_path / "rejected" / "cluster").glob("*"))


def test_unreachable_tracking_server_refuses_to_submit(
    local_cluster: dict[str, str], tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    overrides = [f"root={tmp_path}", "cluster.time=00:05:00", f"tracking.uri={url}"]
    with pytest.raises(cluster.ClusterError, match=f"MLflow tracking server {url} is unreachable"):
        cluster.submit_chain(load_config(TINY, overrides), TINY, overrides, stages=["prepare"])
