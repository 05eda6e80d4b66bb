"""Resource faults: a full or read-only output disk (a small tmpfs, mounted as root).

A stage that cannot write must stop with one line naming the problem and the file, no
traceback, exit code 2, and leave nothing that looks complete or takes space: no manifest, no
``.<stage>.partial``, no half-built model folder in the cache, and a previous complete output
untouched. Once there is room, rerunning the same command completes.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline.cli import stage_main
from pipeline.config import RunConfig, load_config
from pipeline.runstore import RunStore
from tests.conftest import REPO, TINY

Mount = Callable[..., Path]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Mount]:
    """tmpfs("name", "256k", read_only=False) -> a fresh tmpfs mount point; unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted: list[Path] = []

    def mount(name: str, size: str, read_only: bool = False) -> Path:
        point = tmp_path / name
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(point)
        return point

    try:
        yield mount
    finally:
        for point in reversed(mounted):
            if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(point)], capture_output=True)


def remount(point: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(point)], check=True)


def used_kib(point: Path) -> int:
    st = os.statvfs(point)
    return (st.f_blocks - st.f_bfree) * st.f_frsize // 1024


def prepare(root: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "stages.prepare",
        "--config",
        str(TINY),
        f"root={root}",
        f"cache_dir={cache}",
        *extra,
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def error_line(done: subprocess.CompletedProcess[str], stage: str = "prepare") -> str:
    """The one error line of a failed stage (and no traceback)."""
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith(f"midpo {stage}: error:")]
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]


def config(root: Path, cache: Path) -> RunConfig:
    return load_config(TINY, [f"root={root}", f"cache_dir={cache}"])


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


def outputs(cfg: RunConfig, stage: str = "prepare") -> dict[str, str]:
    manifest = RunStore(cfg).complete_manifest(stage)
    assert manifest is not None
    return {k: v["sha256"] for k, v in manifest["outputs"].items()}


def test_full_disk_while_building_the_model_then_rerun_completes(tmpfs: Mount) -> None:
    disk = tmpfs("disk", "256k")  # the tiny model alone is ~950 KiB
    root, cache = disk / "runs", disk / "cache"
    line = error_line(prepare(root, cache))
    assert line.startswith(f"midpo prepare: error: no space left on device writing {cache}/"), line
    assert "model.safetensors" in line  # safetensors' own error names no file: we do
    # Nothing half-written anywhere: no model folder (nor its temp sibling), no partial stage
    # folder, no manifest. Only empty folders and the failed stage's log (pipeline/console.py)
    # may remain.
    assert files_under(disk) == ["runs/tiny/prepare.log"]
    assert not (cache / "models" / "tiny-seed0").exists()
    assert not (root / "tiny" / ".prepare.partial").exists()

    remount(disk, "4m")
    done = prepare(root, cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert set(outputs(config(root, cache))) == {
        "human_pairs.parquet",
        "prompts/eval.parquet",
        "prompts/test.parquet",
        "prompts/train.parquet",
    }
    assert (cache / "models" / "tiny-seed0" / ".complete").is_file()


def test_full_disk_while_writing_stage_outputs_keeps_the_previous_output(
    tmpfs: Mount,
) -> None:
    disk = tmpfs("disk", "4m")
    root, cache = disk / "runs", disk / "cache"
    cfg = config(root, cache)
    assert prepare(root, cache).returncode == 0
    first = outputs(cfg)
    partial = root / "tiny" / ".prepare.partial"

    # A forced rerun on a full disk (8 KiB free; the outputs need ~24): the model is cached,
    # so the failure is in the run store's own files (pyarrow). The previous output stays.
    remount(disk, f"{used_kib(disk) + 8}k")
    line = error_line(prepare(root, cache, "--force"))
    assert line.startswith(f"midpo prepare: error: no space left on device writing {partial}/")
    assert not partial.exists()
    assert outputs(cfg) == first

    # Without a previous output: nothing complete appears at all.
    shutil.rmtree(root / "tiny" / "prepare")
    remount(disk, f"{used_kib(disk) + 8}k")
    line = error_line(prepare(root, cache))
    assert f"no space left on device writing {partial}/" in line
    # (the MLflow store and parent run pointer are the first, complete run's)
    assert files_under(root) == ["mlflow.db", "tiny/mlflow_parent.json"]

    remount(disk, "4m")
    done = prepare(root, cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert outputs(cfg) == first


@pytest.mark.parametrize("where", ["root", "cache_dir"])
def test_read_only_output_folder_is_one_clear_line(
    where: str, tmpfs: Mount, tmp_path: Path
) -> None:
    read_only = tmpfs("ro", "64k", read_only=True)
    root = read_only if where == "root" else tmp_path / "runs"
    cache = read_only if where == "cache_dir" else tmp_path / "cache"
    line = error_line(prepare(root, cache))
    assert line.startswith(f"midpo prepare: error: read-only file system: cannot write {read_only}")
    assert files_under(tmp_path) == []  # (the writable one too: its partial folder is gone)


def test_manifest_on_a_full_disk_leaves_no_partial_folder(tmpfs: Mount) -> None:
    """The last writes of a stage (its manifest, the rename) can fail too."""
    disk = tmpfs("disk", "64k")
    cfg = config(disk / "runs", disk / "cache")
    with pytest.raises(OSError) as failure, RunStore(cfg).stage("prepare") as st:
        st_ = os.statvfs(disk)
        # every block but one byte's worth: the outputs fit, the manifest does not
        (st.dir / "outputs.bin").write_bytes(b"x" * (st_.f_bavail * st_.f_frsize - 100))
    assert failure.value.errno == errno.ENOSPC
    assert files_under(disk) == []
    assert RunStore(cfg).complete_manifest("prepare") is None


# -- in-process: which errors become one line ------------------------------------------------


class SafetensorLikeError(Exception):
    """What safetensors and tokenizers raise: Rust's io::Error text, no errno, no file name."""


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "no space left on device writing "),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk quota exceeded writing "),
        (
            PermissionError(errno.EACCES, "Permission denied", "/data/runs/tiny"),
            "permission denied: /data/runs/tiny:",
        ),
        (
            SafetensorLikeError("I/O error: No space left on device (os error 28)"),
            "no space left on device writing ",
        ),
    ],
)
def test_disk_errors_become_one_line(
    error: BaseException, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "runs" / "tiny" / ".prepare.partial" / "train.parquet"

    def run(cfg: RunConfig, store: RunStore, force: bool) -> None:
        where = target  # noqa: F841  (the file being written: a local, as in a library's frame)
        raise error

    with pytest.raises(SystemExit) as exit_:
        stage_main("prepare", run, ["--config", str(TINY), f"root={tmp_path / 'runs'}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"midpo prepare: error: {expected}"), err
    if getattr(error, "filename", None) is None:  # found in the failing frame's locals
        assert f"writing {target}:" in err, err
    assert err.endswith("then rerun the same command")


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOENT, "No such file or directory", "/nowhere"),  # not a disk problem
        PermissionError(errno.EPERM, "Operation not permitted"),  # no file: e.g. os.kill
        RuntimeError("I/O error: connection reset (os error 104)"),
        Exception("No such file or directory (os error 2)"),  # Rust, but not a disk error
    ],
)
def test_other_errors_keep_their_traceback(error: BaseException, tmp_path: Path) -> None:
    def run(cfg: RunConfig, store: RunStore, force: bool) -> None:
        raise error

    with pytest.raises(type(error)):
        stage_main("prepare", run, ["--config", str(TINY), f"root={tmp_path / 'runs'}"])
