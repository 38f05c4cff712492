"""``sitedirector``: run the SiteDirector daemon, one cycle, a dry run, or show pilots per queue."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from typing import Any, Optional, Sequence

from .config import ConfigError, load

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def build_parser() -> argparse.ArgumentParser:
    """The ``sitedirector`` command line."""
    parser = argparse.ArgumentParser(prog="sitedirector", description="Turn task-queue demand into pilots.")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("run", "cycle every cycle_interval seconds until SIGTERM"),
        ("once", "one cycle, waiting for every queue's CE work"),
        ("status", "pilots per queue and state"),
        ("check", "validate the configuration and exit"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("-c", "--config", default="sitedirector.yml", help="YAML configuration file")
        if name in ("run", "once"):
            p.add_argument("--dry-run", action="store_true", help="print the decisions, start no pilots")
        if name == "status":
            p.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _print_status(table: list[dict[str, Any]]) -> None:
    states = sorted({s for row in table for s in row["states"]})
    header = ["queue", "type", *states, "empty"]
    lines = [header] + [
        [row["queue"], row["type"], *(str(row["states"].get(s, 0)) for s in states), str(row["empty"])] for row in table
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
    for row in table:
        for pilot in row.get("failed") or []:
            print(f"{row['queue']}: pilot {pilot['stamp']} {pilot['status']}: {pilot['reason'] or 'no reason given'}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``sitedirector`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"sitedirector: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.command == "check":
        print(f"{args.config}: OK, {len(config.queues)} queues")
        return 0
    from .ce.base import CEError
    from .director import Director, SchedulerError

    try:
        director = Director(config)
    except CEError as exc:
        print(f"sitedirector: {exc}", file=sys.stderr)
        return 2
    if args.command == "status":
        try:
            table = director.status_table()
        except SchedulerError as exc:
            print(f"sitedirector: {exc}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(table, indent=1))
        else:
            _print_status(table)
        return 0
    if args.command == "once":
        decisions = director.cycle(dry_run=args.dry_run, wait=True)
        if args.dry_run:
            for d in decisions:
                print(d.describe())
        director.shutdown()
        return 1 if director.last_error else 0
    signal.signal(signal.SIGTERM, lambda *_: director.stop())
    signal.signal(signal.SIGINT, lambda *_: director.stop())
    logging.getLogger("sitedirector").info("starting: %d queues, cycle %gs", len(config.queues), config.cycle_interval)
    director.run(dry_run=args.dry_run)
    logging.getLogger("sitedirector").info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
