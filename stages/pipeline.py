"""pipeline: prepare -> generate -> score -> train -> evaluate -> promote, each skipped when
up to date. Ends by printing the measured reward gain on held-out prompts."""

from __future__ import annotations

import json
import time

from pipeline.cli import stage_main
from pipeline.config import STAGES, RunConfig
from pipeline.console import console
from pipeline.runstore import RunStore
from stages.chain import run_stages


def run(cfg: RunConfig, store: RunStore, force: bool = False) -> None:
    started = time.time()
    run_stages(cfg, STAGES, force)
    print(f"\n[pipeline] {cfg.name}: done in {time.time() - started:.0f} s", file=console)
    report = store.stage_dir("evaluate") / "report.json"
    if report.is_file():
        summary = json.loads(report.read_text()).get("summary", {})
        if summary:
            print(json.dumps(summary, indent=2))


def main(argv: list[str] | None = None) -> None:
    stage_main("pipeline", run, argv)


if __name__ == "__main__":
    main()
