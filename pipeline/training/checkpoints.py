"""Checkpoints: engine states + data position, whole or not at all; resume from them.

A checkpoint ``stepN`` is the policy engine's DeepSpeed checkpoint (model, optimizer, scheduler)
with the data position and the marginal prior engine's under ``marginal_prior/stepN``; no RNG
state: each step seeds its own draws (``trainer.step_seed``, on CPU and GPU alike). Its marker
``complete.json`` (every file's size and sha256, hashed by the ranks in parallel) is written
last: resume trusts only a checkpoint whose files match their marker, sets a damaged one aside as
``corrupt-stepN`` and falls back to the one before.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import distributed
from pipeline.config import config_hash
from pipeline.console import console
from pipeline.runstore import atomic_write_json
from pipeline.training.errors import TrainingError

if TYPE_CHECKING:  # the plan names this module's checkpoint_dir; engines come from the plan
    from pipeline.training.engines import Engines
    from pipeline.training.plan import TrainPlan

CHECKPOINT_MARKER = "complete.json"


def checkpoint_dir(scratch: Path, key: dict[str, Any]) -> Path:
    """Checkpoints live under a key of everything that must match to resume (config, data, world)."""
    return scratch / f"ckpt-{config_hash(key)}"


def prepare_checkpoint_dir(root: Path, fresh: bool) -> None:
    """Rank 0, before training: empty ``root`` if ``fresh`` (--force), and delete checkpoints of
    other configs or data beside it (they can never be resumed)."""
    if fresh:
        shutil.rmtree(root, ignore_errors=True)
    for stale in root.parent.glob("ckpt-*"):
        if stale != root:
            shutil.rmtree(stale, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)


def drop_resumable_checkpoints(scratch: Path) -> int:
    """After the stage's output is committed: delete the checkpoints under ``scratch`` (they only
    served a resume after a kill; ~16 bytes per parameter each), keeping any set aside as
    ``corrupt-stepN`` for inspection. Returns how many were deleted."""
    dropped = 0
    for root in scratch.glob("ckpt-*"):
        for step in root.glob("step*"):
            shutil.rmtree(step, ignore_errors=True)
            dropped += 1
        (root / "latest.json").unlink(missing_ok=True)
    return dropped


def read_latest(root: Path) -> dict[str, Any] | None:
    """The newest checkpoint marked complete ({"tag", "step"}); not yet verified."""
    steps = _complete_steps(root)
    return {"tag": f"step{steps[0]}", "step": steps[0]} if steps else None


class Checkpoints:
    """The checkpoints of one plan, saved and resumed by every rank together."""

    def __init__(self, plan: TrainPlan, ranks: distributed.Ranks) -> None:
        self.plan = plan
        self.root = plan.checkpoint_dir
        self.ranks = ranks

    def save(self, step: int, engines: Engines) -> None:
        """Engine (model, optimizer, scheduler) + data position + RNG; then mark it complete."""
        root, tag, ranks = self.root, f"step{step}", self.ranks
        state = {
            "step": step,
            "data_signature": self.plan.data.signature(),
            "data_position": self.plan.data_position(step),
        }
        engines.policy.save_checkpoint(str(root), tag=tag, client_state=state, save_latest=False)
        if engines.marginal is not None:
            engines.marginal.save_checkpoint(
                str(root / "marginal_prior"), tag=tag, save_latest=False
            )
        distributed.barrier()  # every rank's shards are on disk before they are hashed
        mine = _checkpoint_files(root, tag)[ranks.rank :: ranks.world_size]
        digests: dict[str, Any] = {}
        for part in distributed.gather_objects({name: _file_digest(root / name) for name in mine}):
            digests.update(part)
        if ranks.is_main:
            atomic_write_json(root / tag / CHECKPOINT_MARKER, {"step": step, "files": digests})
            atomic_write_json(root / "latest.json", {"tag": tag, "step": step})
            keep = {f"step{s}" for s in _complete_steps(root)[: self.plan.train.keep_checkpoints]}
            for old in sorted(root.glob("step*")):
                if old.name not in keep:
                    shutil.rmtree(old, ignore_errors=True)
                    shutil.rmtree(root / "marginal_prior" / old.name, ignore_errors=True)
        distributed.barrier()

    def resume(self, engines: Engines) -> int:
        """Load the newest intact checkpoint, if any; the optimizer step to continue from.

        A checkpoint whose files do not match its marker (truncated, corrupt, missing) is
        reported and set aside as ``corrupt-stepN``, and the previous one is tried.
        """
        root, ranks = self.root, self.ranks
        for step in _complete_steps(root):
            tag = f"step{step}"
            recorded = json.loads((root / tag / CHECKPOINT_MARKER).read_text())["files"]
            names = sorted(recorded)[ranks.rank :: ranks.world_size]
            mine = [p for n in names if (p := _digest_problem(root, n, recorded[n]))]
            problems = [p for part in distributed.gather_objects(mine) for p in part]
            if not problems:
                return self._load(tag, engines)
            if ranks.is_main:
                print(
                    f"[train] checkpoint {root / tag} is damaged ({'; '.join(problems[:3])}); "
                    "set aside as corrupt-" + tag + ", falling back to the previous checkpoint",
                    file=console,
                )
                for folder in (root / tag, root / "marginal_prior" / tag):
                    if folder.is_dir():
                        aside = folder.with_name(f"corrupt-{tag}")
                        shutil.rmtree(aside, ignore_errors=True)
                        os.replace(folder, aside)
            distributed.barrier()
        return 0

    def _load(self, tag: str, engines: Engines) -> int:
        root = self.root
        path, state = engines.policy.load_checkpoint(str(root), tag=tag)
        if path is None:
            raise TrainingError(f"checkpoint {root / tag} could not be loaded")
        if state.get("data_signature") != self.plan.data.signature():
            raise TrainingError(
                f"checkpoint {path} was made on other training data; rerun with "
                "--force to start over"
            )
        if engines.marginal is not None:
            engines.marginal.load_checkpoint(str(root / "marginal_prior"), tag=tag)
        step = int(state["step"])
        if state.get("data_position") != self.plan.data_position(step):
            raise TrainingError(
                f"checkpoint {path}: its data position does not match this run's "
                "order (batch sizes or seed changed?); rerun with --force"
            )
        if self.ranks.is_main:
            print(f"[train] resuming from {root / tag} (step {step})", file=console)
        return step


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric lines of steps <= ``step`` (a resumed run rewrites what came after)."""
    if not path.is_file():
        return
    lines = [
        ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step
    ]
    path.write_text("".join(ln + "\n" for ln in lines))


# -- files and their digests ---------------------------------------------------------------------


def _complete_steps(root: Path) -> list[int]:
    """Steps of the checkpoints with a completion marker, newest first."""
    markers = root.glob(f"step*/{CHECKPOINT_MARKER}") if root.is_dir() else []
    return sorted((int(p.parent.name[4:]) for p in markers), reverse=True)


def _checkpoint_files(root: Path, tag: str) -> list[str]:
    """Every file of checkpoint ``tag`` (policy engine, RNG states, marginal prior), relative."""
    folders = [root / tag, root / "marginal_prior" / tag]
    return sorted(
        str(p.relative_to(root))
        for folder in folders
        if folder.is_dir()
        for p in folder.rglob("*")
        if p.is_file() and p.name != CHECKPOINT_MARKER
    )


def _file_digest(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def _digest_problem(root: Path, name: str, recorded: dict[str, Any]) -> str | None:
    """Why checkpoint file ``name`` does not match its recorded size and hash, or None."""
    path = root / name
    if not path.is_file():
        return f"{name} is missing"
    size = path.stat().st_size
    if size != recorded["size"]:
        return f"{name} has {size} bytes, expected {recorded['size']}"
    if _file_digest(path)["sha256"] != recorded["sha256"]:
        return f"{name} does not match its sha256"
    return None
