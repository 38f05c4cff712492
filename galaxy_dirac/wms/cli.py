"""``galaxy-dirac-wms``: serve the embedded scheduler, mint tokens, list jobs, pilots and task queues, upgrade the
schema."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Any, Sequence

from .config import ENV_PREFIX, ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from .migrations import Upgrade

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
    create.add_argument("--role", required=True, choices=["admin", "runner", "reader", "director", "pilot"])
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
    db = sub.add_parser("db", help="the database schema (migrations)")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    for name, text in (
        ("upgrade", "bring the database to this version's schema (serve does it on start)"),
        ("current", "print the database's schema revision and this version's head (exit status 3: upgrade due)"),
    ):
        _common(db_sub.add_parser(name, help=text))
    plot = sub.add_parser("plot", help="draw an accounting plot (PNG) or export its numbers (JSON/CSV)")
    _common(plot)
    plot.add_argument("kind", choices=ACCOUNTING_KINDS)
    plot.add_argument("--since", default="30d", help="ISO time or an age (24h, 7d, 30d); default 30d")
    plot.add_argument("--until", default="", help="ISO time or an age; default now")
    plot.add_argument("--bucket", default="1d", help="bucket length: 15m, 1h, 1d, 1w or seconds; default 1d")
    plot.add_argument("-o", "--output", required=True, help="output file ('-' for stdout)")
    plot.add_argument("--format", choices=["png", "json", "csv"], help="default: from the output file's extension")
    plot.add_argument("--width", type=int, default=1200, help="PNG width in pixels")
    plot.add_argument("--height", type=int, default=600, help="PNG height in pixels")
    return parser


#: Kept in step with accounting.KINDS (not imported here so ``--help`` needs no database code).
ACCOUNTING_KINDS = (
    "running-jobs-by-group",
    "jobs-by-site",
    "cumulative-jobs-by-site",
    "cumulative-walltime-by-group",
    "pilots-per-ce",
)


def plot(settings: Settings, args: argparse.Namespace) -> int:
    """Aggregate straight from the database (no server needed) and write PNG, JSON or CSV."""
    from . import accounting
    from .db import create_schema, make_engine

    fmt = args.format or (os.path.splitext(args.output)[1].lstrip(".").lower() or "png")
    if fmt not in ("png", "json", "csv"):
        print(f"galaxy-dirac-wms: cannot tell the format of {args.output!r}; pass --format", file=sys.stderr)
        return 2
    engine = make_engine(settings.db)
    create_schema(engine)
    try:
        data = accounting.aggregate(
            engine,
            args.kind,
            accounting.parse_time(args.since),
            accounting.parse_time(args.until or None),
            accounting.parse_duration(args.bucket),
        )
    except accounting.AccountingError as exc:
        print(f"galaxy-dirac-wms: {exc}", file=sys.stderr)
        return 2
    if fmt == "png":
        payload = accounting.render_png(data, args.width, args.height)
    elif fmt == "csv":
        payload = accounting.to_csv(data).encode()
    else:
        payload = (json.dumps(data, indent=1) + "\n").encode()
    if args.output == "-":
        sys.stdout.buffer.write(payload)
    else:
        with open(args.output, "wb") as fh:
            fh.write(payload)
    return 0


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
        if args.command == "plot":
            return plot(settings, args)
        if args.command == "db":
            return database(settings, args)
        return listing(settings, args)
    except ConfigError as exc:
        print(f"galaxy-dirac-wms: {exc}", file=sys.stderr)
        return 2


def serve(settings: Settings) -> int:
    import uvicorn

    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    os.makedirs(settings.sandbox_dir, exist_ok=True)
    settings.signing_key(create=True)
    from .migrations import SchemaError

    try:
        # Once, before any worker starts (each worker's own check then finds it done).
        logging.getLogger(__name__).info("database schema: %s", _upgrade_schema(settings).describe())
    except SchemaError as exc:
        print(f"galaxy-dirac-wms: {exc}", file=sys.stderr)
        return 1
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
        # Worker processes do not inherit basicConfig: without a root handler their INFO lines (maintenance, lease
        # changes) would be lost.
        log_config["root"] = {"handlers": ["default"], "level": settings.log_level.upper()}
        # Workers are separate processes: hand them the resolved settings through the environment.
        for name, value in settings.__dict__.items():
            os.environ[ENV_PREFIX + name.upper()] = json.dumps(value) if isinstance(value, dict) else str(value)
        os.environ.pop(ENV_PREFIX + "CONFIG", None)
        uvicorn.run(
            "galaxy_dirac.wms.api:app_from_env",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_config=log_config,
            timeout_graceful_shutdown=3,
        )
    else:
        from .api import create_app

        # Long-polling matches would hold a graceful shutdown for up to their wait: give them a few seconds only.
        uvicorn.run(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            log_config=log_config,
            timeout_graceful_shutdown=3,
        )
    return 0


def _sqlite_file(url: str) -> str | None:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    database = parsed.database
    return database if parsed.get_backend_name() == "sqlite" and database and database != ":memory:" else None


def _upgrade_schema(settings: Settings) -> Upgrade:
    from .db import make_engine
    from .migrations import upgrade

    path = _sqlite_file(settings.db)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    engine = make_engine(settings.db)
    try:
        return upgrade(engine)
    finally:
        engine.dispose()


def database(settings: Settings, args: argparse.Namespace) -> int:
    """``db upgrade`` / ``db current``: what ``serve`` does to the schema on start, or just where it stands."""
    from sqlalchemy.exc import OperationalError

    from .db import make_engine
    from .migrations import SchemaError, current, head

    try:
        if args.db_command == "upgrade":
            print(_upgrade_schema(settings).describe())
            return 0
        path = _sqlite_file(settings.db)
        if path and not os.path.exists(path):
            revision = None  # not created yet (and `current` must not create it)
        else:
            engine = make_engine(settings.db)
            try:
                revision = current(engine)
            finally:
                engine.dispose()
    except (SchemaError, OperationalError) as exc:
        print(f"galaxy-dirac-wms: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"{revision or 'none'} (head {head()})")
    return 0 if revision == head() else 3


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
            engine,
            Principal("admin", "cli", "", ""),
            parameters=columns,
            search=search,
            sort=[{"parameter": "JobID", "direction": "desc"}],
            per_page=args.limit,
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
