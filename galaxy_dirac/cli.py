"""``galaxy-dirac``: operator commands for a Galaxy that sends jobs to a DiracX.

``galaxy-dirac login --url https://diracx.example.org [--group G]`` runs DiracX's device flow (open the printed
URL in any browser, log in at the VO's identity provider) and stores the login where the Galaxy runner reads it:
``--credentials FILE``, else ``$GALAXY_DIRAC_CREDENTIALS_FILE``, else
``~/.config/galaxy-dirac/diracx-credentials.json`` of the user running the command (run it as Galaxy's user).
``galaxy-dirac login --status`` says whose login it is, for which group, and until when it can be renewed.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from galaxy_dirac.client import WMSError
from galaxy_dirac.credentials import default_credentials_file, describe, device_login


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="galaxy-dirac", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    login = commands.add_parser("login", help="log in to a DiracX (device flow) or show the stored login")
    login.add_argument("--url", help="DiracX base URL, e.g. https://diracx.example.org")
    login.add_argument("--vo", help="the VO (default: the server's only one)")
    login.add_argument("--group", help="the DIRAC group (default: the VO's default group)")
    login.add_argument(
        "--credentials",
        default=None,
        help=f"credentials file (default: $GALAXY_DIRAC_CREDENTIALS_FILE or {default_credentials_file()})",
    )
    login.add_argument("--status", action="store_true", help="show the stored login instead of logging in")
    login.add_argument("--interval", type=float, default=5.0, help="seconds between polls of the token endpoint")
    login.add_argument("--ca", default=None, help="CA bundle for the server's certificate")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``galaxy-dirac`` console script."""
    args = _parser().parse_args(argv)
    path = args.credentials or default_credentials_file()
    try:
        if args.status:
            text, usable = describe(path)
            print(text)
            return 0 if usable else 1
        if not args.url:
            print("galaxy-dirac login: --url is needed (or --status)", file=sys.stderr)
            return 2
        device_login(
            args.url,
            path,
            vo=args.vo,
            group=args.group,
            interval=args.interval,
            verify=args.ca or True,
            show=lambda text: print(text, flush=True),
        )
        print(describe(path)[0], flush=True)
        return 0
    except WMSError as exc:
        print(f"galaxy-dirac login: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
