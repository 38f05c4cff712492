"""Regular expressions from search requests, bounded so that none can freeze the scheduler.

SQLite has no regex engine of its own: SQLAlchemy registers Python's ``re``, which runs inside the server holding
the GIL, and a backtracking pattern such as ``^(a|a)*$`` takes exponential time. Python's ``re`` has no timeout, so
the cost is bounded by what is accepted, on every database alike:

- at most :data:`MAX_PATTERN` characters;
- no backreferences, lookarounds, conditionals, atomic groups or possessive repeats (engines differ on them anyway);
- only single characters or classes are repeated (``a*``, ``[0-9]+``, ``.{0,5}``), never groups, so no nested or
  ambiguous repetition; at most :data:`MAX_REPEATS` repetitions per pattern (each one multiplies the worst case by
  the subject's length: three already take seconds against 255 characters).

On SQLite the scheduler also replaces the ``REGEXP`` function with one that refuses subjects longer than
:data:`MAX_SUBJECT` characters and stops a statement that runs past its time budget (:func:`budget`).
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
import time
from re import _constants as sre  # type: ignore[attr-defined]
from re import _parser as sre_parse  # type: ignore[attr-defined]
from typing import Any, Iterator, Optional

from .errors import Invalid

MAX_PATTERN = 256
MAX_REPEATS = 2
MAX_SUBJECT = 512
#: Seconds one statement may spend in regex matching on SQLite.
DEFAULT_BUDGET = 5.0

_SINGLE = {sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN, sre.CATEGORY}
_REFUSED = {
    sre.GROUPREF: "backreferences",
    sre.GROUPREF_EXISTS: "conditional groups",
    sre.ASSERT: "lookahead/lookbehind",
    sre.ASSERT_NOT: "lookahead/lookbehind",
}
for _name, _what in (("ATOMIC_GROUP", "atomic groups"), ("POSSESSIVE_REPEAT", "possessive repeats")):
    if hasattr(sre, _name):
        _REFUSED[getattr(sre, _name)] = _what
_REPEATS = {sre.MAX_REPEAT, sre.MIN_REPEAT}


def check_pattern(pattern: str) -> None:
    """Refuse (:class:`Invalid`, a 400) a pattern that is malformed or could take more than polynomial time."""
    if len(pattern) > MAX_PATTERN:
        raise Invalid(f"regular expression longer than {MAX_PATTERN} characters")
    try:
        parsed = sre_parse.parse(pattern)
    except (re.error, OverflowError, RecursionError) as exc:
        raise Invalid(f"regular expression {pattern!r} is not valid: {exc}") from None
    repeats = _walk(parsed, pattern)
    if repeats > MAX_REPEATS:
        raise Invalid(
            f"regular expression {pattern!r} has {repeats} repetitions (*, +, {{m,n}}); at most {MAX_REPEATS} are "
            "accepted so that a search cannot run for minutes"
        )


def _walk(parsed: Any, pattern: str) -> int:
    repeats = 0
    for op, av in parsed:
        if op in _REFUSED:
            raise Invalid(f"regular expression {pattern!r} uses {_REFUSED[op]}, which searches do not accept")
        if op in _REPEATS:
            low, high, item = av
            if high > 1:
                body = list(item)
                if len(body) != 1 or body[0][0] not in _SINGLE:
                    raise Invalid(
                        f"regular expression {pattern!r} repeats a group; only single characters or classes may be "
                        "repeated (nested or ambiguous repetition can take exponential time)"
                    )
                repeats += 1
            else:
                repeats += _walk(item, pattern)
        elif op is sre.SUBPATTERN:
            repeats += _walk(av[-1], pattern)
        elif op is sre.BRANCH:
            repeats += sum(_walk(branch, pattern) for branch in av[1])
    return repeats


# --- SQLite's REGEXP ---------------------------------------------------------------------------------------------
class _Budget(threading.local):
    deadline: Optional[float] = None
    exceeded: Optional[str] = None


_budget = _Budget()


class RegexBudgetExceeded(Exception):
    """Raised inside SQLite's REGEXP function: SQLite reports it as an OperationalError of the statement."""


@functools.lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern[str]:
    check_pattern(pattern)  # the same rules again: REGEXP could be reached by some other query
    return re.compile(pattern)


def sqlite_regexp(pattern: Optional[str], subject: Optional[str]) -> Optional[bool]:
    """``subject REGEXP pattern`` for SQLite, within the statement's budget."""
    if pattern is None or subject is None:
        return None
    subject = str(subject)
    if len(subject) > MAX_SUBJECT:
        _budget.exceeded = f"a value longer than {MAX_SUBJECT} characters cannot be searched with a regex"
        raise RegexBudgetExceeded(_budget.exceeded)
    if _budget.deadline is not None and time.monotonic() > _budget.deadline:
        _budget.exceeded = "the regex search took too long; narrow it with other search conditions"
        raise RegexBudgetExceeded(_budget.exceeded)
    return _compiled(pattern).search(subject) is not None


def install_sqlite_regexp(dbapi_connection: Any) -> None:
    """Replace SQLAlchemy's REGEXP (plain ``re.search``) on a new SQLite connection."""
    dbapi_connection.create_function("regexp", 2, sqlite_regexp, deterministic=True)


@contextlib.contextmanager
def budget(seconds: Optional[float] = None) -> Iterator[None]:
    """Run statements with a regex time budget (default :data:`DEFAULT_BUDGET`); a statement that exceeded it
    becomes a 400 naming why."""
    from sqlalchemy.exc import OperationalError

    previous = _budget.deadline
    _budget.deadline = time.monotonic() + (DEFAULT_BUDGET if seconds is None else seconds)
    _budget.exceeded = None
    try:
        yield
    except OperationalError as exc:
        if _budget.exceeded:
            raise Invalid(_budget.exceeded) from exc
        raise
    finally:
        _budget.deadline = previous
