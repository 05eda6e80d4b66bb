"""``midpo``: one command for every stage and chain.

midpo <command> [--config FILE] [--force] [key=value ...]
midpo show-config [--config FILE] [key=value ...]     # the validated config, as YAML
"""

from __future__ import annotations

import importlib
import sys

from pipeline.cli import exit_cleanly, stage_parser
from pipeline.config import STAGES, ConfigError, load_config

# Chains of stages, beside the stages themselves.
CHAINS = ("pipeline", "iterate", "frontier")


def show_config(argv: list[str]) -> None:
    args = stage_parser("midpo show-config").parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"midpo: error: {e}", file=sys.stderr)
        sys.exit(2)
    import yaml

    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = (*STAGES, *CHAINS, "show-config")
    if not argv or argv[0] not in commands:
        print(
            f"usage: midpo {{{','.join(commands)}}} [--config FILE] [--force] [key=value ...]",
            file=sys.stderr,
        )
        sys.exit(2)
    command, rest = argv[0], argv[1:]
    if command == "show-config":
        show_config(rest)
        return
    importlib.import_module(f"stages.{command}").main(rest)
    exit_cleanly(0)


if __name__ == "__main__":
    main()
