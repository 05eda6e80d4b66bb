"""Command line: ``python -m stages.<name> [--config FILE] [--force] [key=value ...]`` and ``midpo``.

Every stage module exposes ``run(cfg, store, force) -> None``; ``stage_main`` parses the
command line, loads and validates the config, and turns known errors into one clear line.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable

from pipeline.config import STAGES, ConfigError, RunConfig, load_config
from pipeline.runstore import RunStore, StageError

DEFAULT_CONFIG = "configs/demo.yaml"

StageFn = Callable[[RunConfig, RunStore, bool], None]


def _known_errors() -> tuple[type[BaseException], ...]:
    from pipeline.data import DataError
    from pipeline.models import ModelError
    from pipeline.tracking import TrackingError

    return (ConfigError, StageError, ModelError, DataError, TrackingError)


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument(
        "--config",
        default=os.environ.get("MIDPO_CONFIG", DEFAULT_CONFIG),
        help="run YAML (default: %(default)s)",
    )
    p.add_argument("--force", action="store_true", help="rerun even if outputs are up to date")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="dotted config overrides, e.g. train.objective=simpo train.beta=2.0",
    )
    return p


def stage_main(stage: str, run: StageFn, argv: list[str] | None = None) -> None:
    args = _parser(f"python -m stages.{stage}").parse_args(argv)
    errors = _known_errors()
    try:
        cfg = load_config(args.config, args.overrides)
        run(cfg, RunStore(cfg), args.force)
    except errors as e:
        print(f"midpo {stage}: error: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    """``midpo <stage> [--config FILE] [--force] [overrides]`` or ``midpo show-config``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = (*STAGES, "show-config")
    if not argv or argv[0] not in commands:
        print(
            f"usage: midpo {{{','.join(commands)}}} [--config FILE] [--force] [key=value ...]",
            file=sys.stderr,
        )
        sys.exit(2)
    command, rest = argv[0], argv[1:]
    if command == "show-config":
        args = _parser("midpo show-config").parse_args(rest)
        try:
            cfg = load_config(args.config, args.overrides)
        except ConfigError as e:
            print(f"midpo: error: {e}", file=sys.stderr)
            sys.exit(2)
        import yaml

        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
        return
    module = importlib.import_module(f"stages.{command}")
    module.main(rest)
