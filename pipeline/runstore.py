"""Run store: ``runs/<run>/<stage>/`` with a manifest, atomic outputs, skip / force / stale checks.

A stage writes into a private ``.<stage>.partial`` folder; only when it finishes is the
manifest written and the folder renamed into place. A killed or failed stage therefore never
leaves a folder that looks complete: downstream stages look for a manifest whose status is
``complete`` and whose recorded files are all present with their recorded sizes.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig, config_hash, stage_config
from pipeline.console import console

MANIFEST = "manifest.json"


class StageError(RuntimeError):
    """A stage cannot run: missing, incomplete or stale upstream output, or bad input."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see either the old content or the new, never a prefix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def json_safe(v: Any) -> Any:
    """NaN/inf -> None, in nested dicts and lists: files others parse are strict JSON."""
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [json_safe(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(
        path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()
    )


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def content_fingerprint(path: Path, memo: Path | None = None) -> str:
    """Identity of a file's or folder's contents (relative names and sha256 of every file).

    Size, mtime, ctime and inode are the fast path: a file whose stat matches the entry
    remembered in ``memo`` (a JSON file) keeps its hash; any other file is hashed again, so
    rewriting a file in place with new content is always noticed and a mere ``touch`` (same
    bytes, so the same fingerprint) reruns nothing.
    """
    path = path.expanduser().resolve()
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    known: dict[str, Any] = {}
    if memo is not None and memo.is_file():
        with contextlib.suppress(OSError, ValueError):
            known = json.loads(memo.read_text())
    changed = False
    digests = []
    for f in files:
        st = f.stat()
        stat = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        entry = known.get(str(f))
        if not (isinstance(entry, dict) and entry.get("stat") == stat):
            entry = known[str(f)] = {"stat": stat, "sha256": file_sha256(f)}
            changed = True
        digests.append((f.relative_to(path).as_posix() if f != path else f.name, entry["sha256"]))
    if memo is not None and changed:
        with contextlib.suppress(OSError):  # only a cache: a read-only cache folder still works
            atomic_write_json(memo, known)
    return hashlib.sha256(json.dumps(digests).encode()).hexdigest()[:16]


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    """The manifest of a stage folder, or None when absent. A corrupt manifest is an error."""
    path = stage_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StageError(f"{path}: corrupt manifest ({e}); rerun that stage with --force") from e
    if not isinstance(data, dict) or "stage" not in data or "status" not in data:
        raise StageError(
            f"{path}: corrupt manifest (missing 'stage' or 'status'); rerun with --force"
        )
    return data


def code_version() -> str:
    here = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        rev = ""
    from pipeline import __version__

    return f"{__version__}+{rev}" if rev else __version__


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class StageRun:
    """One execution of a stage: write outputs under ``self.dir``; ``record`` adds manifest info."""

    def __init__(self, stage: str, work_dir: Path, final_dir: Path, skipped: bool) -> None:
        self.stage = stage
        self.dir = work_dir
        self.final_dir = final_dir
        self.skipped = skipped
        self.info: dict[str, Any] = {}

    def record(self, **info: Any) -> None:
        self.info.update(info)


class RunStore:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.root = cfg.run_dir
        self.is_writer = int(os.environ.get("RANK", "0")) == 0

    # -- paths -----------------------------------------------------------------------------
    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def scratch_dir(self, stage: str) -> Path:
        """Persistent per-stage work space (checkpoints) that survives kills; never an output."""
        return self.root / f".{stage}.scratch"

    def expected_hash(self, stage: str) -> str:
        return config_hash(stage_config(self.cfg, stage))

    def fingerprint(self, path: str | Path) -> str:
        """``content_fingerprint`` of an input outside the run store (a data file, a model
        folder, a reward module), its file hashes remembered in the cache."""
        return content_fingerprint(Path(path), Path(self.cfg.cache_dir) / "fingerprints.json")

    # -- reading upstream ------------------------------------------------------------------
    def complete_manifest(self, stage: str) -> dict[str, Any] | None:
        """The manifest if the stage's output is complete and all its files are present."""
        d = self.stage_dir(stage)
        m = read_manifest(d)
        if m is None or m.get("status") != "complete":
            return None
        for rel, meta in m.get("outputs", {}).items():
            f = d / rel
            if not f.is_file() or f.stat().st_size != meta["size"]:
                return None
        return m

    def require(self, stage: str, *, check_stale: bool = True) -> dict[str, Any]:
        """Manifest of a finished upstream stage; a clear error naming what to run otherwise."""
        m = self.complete_manifest(stage)
        where = self.stage_dir(stage)
        if m is None:
            raise StageError(
                f"stage '{stage}' has no complete output in {where}: run `make {stage}` first"
            )
        if check_stale and m.get("config_hash") != self.expected_hash(stage):
            raise StageError(
                f"stage '{stage}' output in {where} is stale (its config changed since it ran): "
                f"run `make {stage}` first"
            )
        return m

    # -- the skip test ---------------------------------------------------------------------
    def up_to_date(
        self,
        stage: str,
        inputs: Sequence[str] = (),
        fingerprints: Mapping[str, str] | None = None,
    ) -> bool:
        """True when the stage's complete output was made from this config, these upstream
        outputs and these fingerprints (what lives outside the run store: model folders whose
        weights may change under the same path, the registry's champion)."""
        current = self.complete_manifest(stage)
        return (
            current is not None
            and current.get("config_hash") == self.expected_hash(stage)
            and current.get("input_hashes") == {s: self.require(s)["output_hash"] for s in inputs}
            and current.get("fingerprints", {}) == dict(fingerprints or {})
        )

    def report_skip(self, stage: str) -> None:
        print(
            f"[{stage}] up to date in {self.stage_dir(stage)} (config and inputs unchanged); "
            "skipping. Use --force to rerun.",
            file=console,
        )

    # -- writing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def stage(
        self,
        stage: str,
        inputs: Sequence[str] = (),
        force: bool = False,
        fingerprints: Mapping[str, str] | None = None,
    ) -> Iterator[StageRun]:
        """Run ``stage`` atomically; yields a StageRun whose ``skipped`` says it is up to date.

        ``fingerprints`` join the skip test (``up_to_date``) and are recorded in the manifest.
        Only the writer (rank 0) may open a stage; other ranks share its results by path.
        """
        if not self.is_writer:
            raise RuntimeError("only rank 0 writes stage outputs")
        cfg_hash = self.expected_hash(stage)
        input_hashes = {s: self.require(s)["output_hash"] for s in inputs}
        final = self.stage_dir(stage)
        if not force and self.up_to_date(stage, inputs, fingerprints):
            self.report_skip(stage)
            yield StageRun(stage, final, final, skipped=True)
            return

        work = self.root / f".{stage}.partial"
        if work.exists():
            shutil.rmtree(work)  # leftovers of a killed run are never reused
        work.mkdir(parents=True)
        run = StageRun(stage, work, final, skipped=False)
        started = _now()
        try:
            yield run
            outputs = {}
            for f in sorted(p for p in work.rglob("*") if p.is_file()):
                rel = f.relative_to(work).as_posix()
                outputs[rel] = {"size": f.stat().st_size, "sha256": file_sha256(f)}
            manifest = {
                "stage": stage,
                "status": "complete",
                "run": self.cfg.name,
                "config_hash": cfg_hash,
                "config": stage_config(self.cfg, stage),
                "input_hashes": input_hashes,
                "fingerprints": dict(fingerprints or {}),
                "outputs": outputs,
                "output_hash": hashlib.sha256(
                    json.dumps(
                        {k: v["sha256"] for k, v in outputs.items()}, sort_keys=True
                    ).encode()
                ).hexdigest()[:16],
                "code_version": code_version(),
                "started": started,
                "finished": _now(),
                **run.info,
            }
            atomic_write_json(work / MANIFEST, manifest)
            self._swap_into_place(work, final)
        except BaseException:  # also a manifest or rename that fails (e.g. a full disk)
            shutil.rmtree(work, ignore_errors=True)
            raise

    @staticmethod
    def _swap_into_place(work: Path, final: Path) -> None:
        # Rename the old output aside first: between the renames there is no stage folder at
        # all (downstream sees "missing", never a mix of old and new files).
        old = final.with_name(f".{final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(work, final)
        shutil.rmtree(old, ignore_errors=True)
