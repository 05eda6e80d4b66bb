"""``midpo``: one command for every stage and chain.

midpo <command> [--config FILE] [--force] [key=value ...]
midpo <command> --help                                 # its options and config keys
midpo -v <command> ...                                 # everything on the terminal, no stage log
midpo show-config [--config FILE] [key=value ...]     # the validated config, as YAML
"""

from __future__ import annotations

import difflib
import importlib
import sys

from pipeline.cli import command_line, exit_cleanly, stage_parser
from pipeline.config import ConfigError, load_config
from stages.chain import DESCRIPTIONS

# Every command and its line in `midpo --help`: the stages, the chains, show-config.
COMMANDS = {
    **DESCRIPTIONS,
    "pipeline": "the whole chain, prepare -> promote, each stage skipped when up to date",
    "iterate": "rounds of generate -> score -> train, each on the previous round's policy",
    "frontier": "reward against KL for several objectives at several strengths",
    "study": "every objective at its defaults and the learnable prior, offline and online, seeds",
    "show-config": "print the validated config (file + overrides) as YAML",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return (
        "usage: midpo [-v] <command> [--config FILE] [--force] [key=value ...]\n\n"
        "commands:\n" + "\n".join(lines) + "\n\n`midpo <command> --help` lists a command's "
        "options and config keys."
    )


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
    if argv[:1] in (["-v"], ["--verbose"]):  # midpo -v <command> = midpo <command> -v
        argv = [*argv[1:2], argv[0], *argv[2:]]
    if argv[:1] in (["-h"], ["--help"], ["help"]):
        print(usage())
        sys.exit(0)
    if not argv or argv[0] not in COMMANDS:
        if argv:
            close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            print(f"midpo: error: unknown command {argv[0]!r}{hint}\n", file=sys.stderr)
        print(usage(), file=sys.stderr)
        sys.exit(2)
    command, rest = argv[0], argv[1:]
    command_line()
    if command == "show-config":
        show_config(rest)
        return
    importlib.import_module(f"stages.{command}").main(rest)
    exit_cleanly(0)


if __name__ == "__main__":
    main()
