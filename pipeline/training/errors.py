"""The one error type of training (a stage error: the CLI reports it without a traceback)."""

from __future__ import annotations

from pipeline.runstore import StageError


class TrainingError(StageError):
    """Training cannot go on (non-finite loss, export mismatch); the message says where and why."""
