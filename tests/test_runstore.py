"""Run store: skip when unchanged, --force, stale/missing upstream, atomic outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.runstore import RunStore, StageError, atomic_write_bytes, content_fingerprint
from tests.conftest import ConfigFactory


def _write_stage(
    store: RunStore, stage: str, payload: str, inputs: tuple[str, ...] = (), force: bool = False
) -> bool:
    with store.stage(stage, inputs=inputs, force=force) as st:
        if st.skipped:
            return False
        (st.dir / "out.txt").write_text(payload)
        st.record(note="hello")
    return True


def test_skip_force_and_manifest(tiny_config: ConfigFactory) -> None:
    store = RunStore(tiny_config())
    assert _write_stage(store, "prepare", "a")
    m = json.loads((store.stage_dir("prepare") / "manifest.json").read_text())
    assert m["status"] == "complete" and m["stage"] == "prepare" and m["note"] == "hello"
    assert set(m) >= {
        "config_hash",
        "input_hashes",
        "outputs",
        "code_version",
        "started",
        "finished",
    }
    assert m["outputs"]["out.txt"]["size"] == 1
    assert not _write_stage(store, "prepare", "b")  # unchanged: skipped
    assert (store.stage_dir("prepare") / "out.txt").read_text() == "a"
    assert _write_stage(store, "prepare", "b", force=True)
    assert (store.stage_dir("prepare") / "out.txt").read_text() == "b"


def test_config_change_reruns_and_downstream_sees_stale(tiny_config: ConfigFactory) -> None:
    store = RunStore(tiny_config())
    _write_stage(store, "prepare", "a")
    assert _write_stage(store, "generate", "g", inputs=("prepare",))
    assert not _write_stage(store, "generate", "g", inputs=("prepare",))
    changed = RunStore(tiny_config("data.prompt_words=5"))
    with pytest.raises(
        StageError, match=r"stage 'prepare' output .* is stale .* run `make prepare`"
    ):
        _write_stage(changed, "generate", "g", inputs=("prepare",))
    # upstream rerun with new content -> downstream input hash changes -> reruns
    _write_stage(changed, "prepare", "a2")
    assert _write_stage(changed, "generate", "g", inputs=("prepare",))


def test_missing_upstream_names_stage(tiny_config: ConfigFactory) -> None:
    store = RunStore(tiny_config())
    with pytest.raises(StageError, match=r"stage 'score' has no complete output .* `make score`"):
        store.require("score")


def test_failed_stage_leaves_nothing(tiny_config: ConfigFactory) -> None:
    store = RunStore(tiny_config())
    with pytest.raises(RuntimeError, match="boom"):
        with store.stage("prepare") as st:
            (st.dir / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert not store.stage_dir("prepare").exists()
    assert not any(p.name.startswith(".prepare") for p in store.root.iterdir())


def test_killed_stage_is_never_complete(tiny_config: ConfigFactory, tmp_path: Path) -> None:
    """kill -9 in the middle of a stage: no output a later stage could take for complete."""
    cfg = tiny_config()
    script = textwrap.dedent(f"""
        import os, signal
        from pipeline.config import load_config
        from pipeline.runstore import RunStore
        cfg = load_config({str(cfg.source)!r}, ["root={cfg.root}", "cache_dir={cfg.cache_dir}"])
        store = RunStore(cfg)
        with store.stage("prepare") as st:
            (st.dir / "half.txt").write_text("half")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent.parent)
    assert proc.returncode == -9
    store = RunStore(cfg)
    assert store.complete_manifest("prepare") is None
    with pytest.raises(StageError, match="no complete output"):
        store.require("prepare")
    assert _write_stage(store, "prepare", "ok")  # rerun cleans up and completes


def test_truncated_output_or_corrupt_manifest_is_detected(tiny_config: ConfigFactory) -> None:
    store = RunStore(tiny_config())
    _write_stage(store, "prepare", "abc")
    out = store.stage_dir("prepare") / "out.txt"
    out.write_text("a")  # truncated behind our back
    assert store.complete_manifest("prepare") is None
    (store.stage_dir("prepare") / "manifest.json").write_text("{not json")
    with pytest.raises(StageError, match="corrupt manifest"):
        store.require("prepare")


def test_atomic_write_interrupted_leaves_old_content(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    atomic_write_bytes(target, b"old")
    script = textwrap.dedent(f"""
        import os, signal
        import pipeline.runstore as rs
        real_fsync = os.fsync
        def die(fd):  # the new bytes are written but not yet renamed into place
            os.kill(os.getpid(), signal.SIGKILL)
        rs.os.fsync = die
        rs.atomic_write_bytes(rs.Path({str(target)!r}), b"new content")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent.parent)
    assert proc.returncode == -9
    assert target.read_bytes() == b"old"
    # a fresh write still works; stray temp files are not outputs
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path).count("f.json") == 1


def test_content_fingerprint_follows_content_not_timestamps(tmp_path: Path) -> None:
    """Size, mtime, ctime and inode only spare re-hashing: a touch keeps the fingerprint; new
    bytes change it, also at the same size and with the old mtime put back; a folder's
    fingerprint covers every file in it."""
    memo = tmp_path / "memo.json"
    data_file = tmp_path / "rows.jsonl"
    data_file.write_text("first\n")
    first = content_fingerprint(data_file, memo)
    assert memo.is_file()
    data_file.touch()
    assert content_fingerprint(data_file, memo) == first
    mtime = data_file.stat().st_mtime_ns
    data_file.write_text("other\n")  # same size
    os.utime(data_file, ns=(mtime, mtime))
    assert content_fingerprint(data_file, memo) != first
    assert content_fingerprint(data_file) == content_fingerprint(data_file, memo)

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "weights.bin").write_bytes(b"\0" * 64)
    before = content_fingerprint(folder, memo)
    (folder / "weights.bin").write_bytes(b"\1" * 64)
    assert content_fingerprint(folder, memo) != before
