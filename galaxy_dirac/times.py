"""The one time format between components: ISO 8601 in UTC with a trailing ``Z`` (DiracX's form).

DIRAC stores times as naive UTC; DiracX writes them as ``2026-12-01T16:30:00.123456Z``; pilots, runners and the
SiteDirector may send zoned times or naive ones meaning UTC. Parsing and writing live here once, in the standard
library only: the pilot and payload zipapps ship this module too. (``fromisoformat`` reads ``Z`` only from Python
3.11, and worker nodes run older ones.)
"""

from __future__ import annotations

import datetime as dt
from typing import Union

__all__ = ["format_time", "now", "parse_time", "to_naive_utc"]


def now() -> dt.datetime:
    """Now, zoned UTC."""
    return dt.datetime.now(dt.timezone.utc)


def to_naive_utc(moment: dt.datetime) -> dt.datetime:
    """Naive UTC, as the databases store it; a naive value is taken to be UTC already.

    Raises ``OverflowError`` when a zoned time's UTC falls outside years 1..9999 (``9999-12-31T23:59:59-23:59``).
    """
    return moment.astimezone(dt.timezone.utc).replace(tzinfo=None) if moment.tzinfo else moment


def format_time(moment: dt.datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS[.ffffff]Z``; a naive value is taken to be UTC."""
    return to_naive_utc(moment).isoformat() + "Z"


def parse_time(value: Union[str, dt.datetime]) -> dt.datetime:
    """A zoned datetime from ISO 8601 text (``Z``, an offset, or naive meaning UTC); ``ValueError`` if not."""
    if isinstance(value, dt.datetime):
        parsed = value
    else:
        text = str(value).strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        parsed = dt.datetime.fromisoformat(text)
    return parsed.replace(tzinfo=dt.timezone.utc) if parsed.tzinfo is None else parsed
