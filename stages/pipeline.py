"""pipeline: prepare -> generate -> score -> train -> evaluate -> promote, each skipped when
up to date. Ends by printing the measured reward gain on held-out prompts."""

from __future__ import annotations

import importlib
import json
import sys
import time

from pipeline.cli import stage_main
from pipeline.config import STAGES, RunConfig
from pipeline.runstore import RunStore


def available_stages() -> list[str]:
    """Stages whose modules exist (all of them once the project is complete)."""
    out = []
    for name in STAGES:
        try:
            importlib.import_module(f"stages.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"stages.{name}":
                raise
            print(
                f"[pipeline] stage {name!r} is not implemented yet; stopping before it",
                file=sys.stderr,
            )
            break
        out.append(name)
    return out


def run(cfg: RunConfig, store: RunStore, force: bool = False) -> None:
    started = time.time()
    for name in available_stages():
        t = time.time()
        print(f"\n=== {name} ===", file=sys.stderr)
        importlib.import_module(f"stages.{name}").run(cfg, RunStore(cfg), force)
        print(f"=== {name}: {time.time() - t:.0f} s ===", file=sys.stderr)
    print(f"\n[pipeline] {cfg.name}: done in {time.time() - started:.0f} s", file=sys.stderr)
    report = store.stage_dir("evaluate") / "report.json"
    if report.is_file():
        summary = json.loads(report.read_text()).get("summary", {})
        if summary:
            print(json.dumps(summary, indent=2))


def main(argv: list[str] | None = None) -> None:
    stage_main("pipeline", run, argv)


if __name__ == "__main__":
    main()
