"""The SLURM chain's command line (``make submit``, ``make cluster-status``):

    python -m stages.cluster submit --config run.yaml [--force] [--wait] [--stages a,b] [k=v ...]
    python -m stages.cluster status --config run.yaml [k=v ...]   # the run's latest chain
    python -m stages.cluster wait   --config run.yaml [k=v ...]
    python -m stages.cluster cancel --config run.yaml [k=v ...]

What each command does is documented in ``pipeline/cluster.py`` and docs/cluster.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from pipeline.cluster import (
    ClusterError,
    cancel_chain,
    chain_status,
    latest_submission,
    submit_chain,
    wait_chain,
)
from pipeline.config import ConfigError, load_config
from pipeline.console import console


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m stages.cluster", description="Run the pipeline as chained SLURM jobs."
    )
    p.add_argument("command", choices=("submit", "status", "wait", "cancel"))
    p.add_argument("--config", default=os.environ.get("MIDPO_CONFIG", "configs/demo.yaml"))
    p.add_argument("--force", action="store_true", help="rerun stages even if up to date")
    p.add_argument("--stages", help="comma-separated subset (default: all six)")
    p.add_argument("--wait", action="store_true", help="submit, then follow the chain to the end")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between polls")
    p.add_argument("--timeout", type=float, default=None, help="give up waiting after seconds")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = p.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "submit":
            stages = (
                [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
            )
            sub = submit_chain(cfg, args.config, args.overrides, stages, args.force)
            status = shlex.join(
                [
                    "python",
                    "-m",
                    "stages.cluster",
                    "status",
                    "--config",
                    args.config,
                    *args.overrides,
                ]
            )
            print(
                f"[submit] chain of {len(sub.jobs)} jobs for run {cfg.name!r}; `{status}` "
                f"follows it; logs in {sub.dir}",
                file=console,
            )
            if args.wait:
                wait_chain(sub, args.poll, args.timeout)
                print(f"[cluster] run {cfg.name!r}: every stage completed", file=console)
        elif args.command == "status":
            sub = latest_submission(cfg)
            print(f"run {sub.run}, submitted {sub.created}, logs in {sub.dir}")
            for job, info in chain_status(sub):
                print(
                    f"  {job.stage:<9} job {job.job_id:<8} {info.state:<12} "
                    f"{info.reason if info.state == 'PENDING' else info.exit_code:<24} {job.log}"
                )
        elif args.command == "wait":
            wait_chain(latest_submission(cfg), args.poll, args.timeout)
            print(f"[cluster] run {cfg.name!r}: every stage completed", file=console)
        else:
            ids = cancel_chain(latest_submission(cfg))
            print(f"[cluster] cancelled jobs {' '.join(ids)}", file=console)
    except (ConfigError, ClusterError) as e:
        print(f"midpo cluster {args.command}: error: {e}", file=console)
        sys.exit(2)


if __name__ == "__main__":
    main()
