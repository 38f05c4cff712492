"""``galaxy-dirac-wms``: serve the embedded scheduler, mint tokens, list jobs, pilots and task queues."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Sequence

from .config import ENV_PREFIX, ConfigError, Settings, load_settings

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help="YAML config file (also GALAXY_DIRAC_WMS_CONFIG)")
    parser.add_argument("--home", help="state directory holding the default SQLite DB, sandboxes and secret")
    parser.add_argument("--db", help="SQLAlchemy URL, e.g. sqlite:///wms.sqlite or postgresql+psycopg://host/db")
    parser.add_argument("--sandbox-dir", help="directory of the sandbox store")
    parser.add_argument("--secret-file", help="file holding the token signing secret")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="galaxy-dirac-wms", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the scheduler's HTTP API and maintenance loop")
    _common(serve)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, help="API worker processes (use a server DB beyond one or two)")
    serve.add_argument("--log-level")

    token = sub.add_parser("token", help="tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = token_sub.add_parser("create", help="mint a token and print it (only the token) on stdout")
    _common(create)
    create.add_argument("--role", required=True, choices=["admin", "runner", "reader", "pilot"])
    create.add_argument("--owner", default="", help="owner name (runner/admin tokens); defaults to the role")
    create.add_argument("--group", default="", help="DIRAC group, e.g. galaxy_user")
    create.add_argument("--vo", help="virtual organisation (defaults to the scheduler's)")
    create.add_argument("--lifetime", type=float, help="seconds (default: the token_lifetime setting)")

    for name, text in (("jobs", "list jobs"), ("pilots", "list pilots"), ("taskqueues", "list task queues")):
        cmd = sub.add_parser(name, help=text)
        _common(cmd)
        cmd.add_argument("--json", action="store_true", help="print JSON instead of a table")
        if name in ("jobs", "pilots"):
            cmd.add_argument("--status", action="append", default=[], help="only this status (repeatable)")
            cmd.add_argument("--limit", type=int, default=100)
        if name == "jobs":
            cmd.add_argument("--owner")
            cmd.add_argument("--site")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        name: getattr(args, name, None)
        for name in ("home", "db", "sandbox_dir", "secret_file", "host", "port", "workers", "log_level")
    }
    return load_settings(args.config, overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
        if args.command == "serve":
            return serve(settings)
        if args.command == "token":
            return token_create(settings, args)
        return listing(settings, args)
    except ConfigError as exc:
        print(f"galaxy-dirac-wms: {exc}", file=sys.stderr)
        return 2


def serve(settings: Settings) -> int:
    import uvicorn

    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    os.makedirs(settings.sandbox_dir, exist_ok=True)
    settings.signing_key(create=True)
    log_config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": {"format": LOG_FORMAT}},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "default"}},
        "loggers": {
            # propagate False: the root logger (basicConfig above) would print every uvicorn line a second time
            "uvicorn": {"handlers": ["default"], "level": settings.log_level.upper(), "propagate": False},
            "uvicorn.access": {"handlers": ["default"], "level": "WARNING", "propagate": False},
        },
    }
    if settings.workers > 1:
        # Workers are separate processes: hand them the resolved settings through the environment.
        for name, value in settings.__dict__.items():
            os.environ[ENV_PREFIX + name.upper()] = json.dumps(value) if isinstance(value, dict) else str(value)
        os.environ.pop(ENV_PREFIX + "CONFIG", None)
        uvicorn.run(
            "galaxy_dirac.wms.api:app_from_env", factory=True, host=settings.host, port=settings.port,
            workers=settings.workers, log_config=log_config,
        )
    else:
        from .api import create_app

        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=log_config)
    return 0


def token_create(settings: Settings, args: argparse.Namespace) -> int:
    from .auth import create_token

    token = create_token(
        settings.signing_key(create=True),
        role=args.role,
        owner=args.owner,
        group=args.group,
        vo=args.vo or settings.vo,
        lifetime=args.lifetime or settings.token_lifetime,
    )
    print(token)
    return 0


def listing(settings: Settings, args: argparse.Namespace) -> int:
    from .db import create_schema, make_engine, read_transaction

    engine = make_engine(settings.db)
    create_schema(engine)
    rows: list[dict[str, Any]]
    if args.command == "jobs":
        from . import jobs
        from .auth import Principal

        search = []
        if args.status:
            search.append({"parameter": "Status", "operator": "in", "values": args.status})
        if args.owner:
            search.append({"parameter": "Owner", "operator": "eq", "value": args.owner})
        if args.site:
            search.append({"parameter": "Site", "operator": "eq", "value": args.site})
        columns = ["JobID", "Status", "MinorStatus", "Site", "Owner", "OwnerGroup", "JobName", "LastUpdateTime"]
        rows, _ = jobs.search(
            engine, Principal("admin", "cli", "", ""), parameters=columns, search=search,
            sort=[{"parameter": "JobID", "direction": "desc"}], per_page=args.limit,
        )
    elif args.command == "pilots":
        from . import pilots

        columns = ["PilotID", "PilotStamp", "Status", "GridSite", "Queue", "MatchedJobs", "LastUpdateTime"]
        rows = [{c: r[c] for c in columns} for r in pilots.list_pilots(engine, statuses=args.status, limit=args.limit)]
    else:
        from . import taskqueues

        columns = ["TQId", "Owner", "OwnerGroup", "CPUTime", "Priority", "Sites", "Tags", "WaitingJobs"]
        with read_transaction(engine) as conn:
            rows = [{c: q[c] for c in columns} for q in taskqueues.demand(conn)]
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
    else:
        _print_table(columns, rows)
    return 0


def _print_table(columns: list[str], rows: list[dict[str, Any]]) -> None:
    cells = [[",".join(map(str, v)) if isinstance(v, list) else str(v) for v in (r[c] for c in columns)] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


if __name__ == "__main__":
    sys.exit(main())
