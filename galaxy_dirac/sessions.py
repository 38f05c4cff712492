"""The one retry policy for our ``requests`` clients (runner → scheduler, DiracX token calls, SiteDirector).

urllib3's ``Retry`` does the work: exponential back-off with jitter, ``Retry-After`` honoured. What differs between
calls is only whether a call may be *replayed* after the request left: reads and idempotent updates may; a
submission or a token refresh may not (a second submission makes a second job; a refresh token is single-use), so
those sessions retry only errors raised before anything was sent. (The pilot and payload are stdlib-only and use
``pilot.http.Backoff`` with the same rules.)
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, Mapping, Optional, Union

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

#: Statuses a replayable call is retried on: the server or a proxy in front of it is briefly unavailable.
RETRYABLE_STATUS = (502, 503, 504)


def retry_policy(retries: int, backoff: float, *, replay: bool) -> Retry:
    """urllib3's policy; without ``replay`` only errors raised before the request was sent are retried."""
    kwargs: Dict[str, Any] = dict(
        total=retries,
        connect=retries,
        read=retries if replay else 0,
        status=retries if replay else 0,
        other=0,
        allowed_methods=None,  # every verb: which calls may be replayed is decided by the session they go through
        status_forcelist=RETRYABLE_STATUS if replay else (),
        backoff_factor=backoff,
        respect_retry_after_header=True,
        raise_on_status=False,
        raise_on_redirect=False,
    )
    accepted = inspect.signature(Retry.__init__).parameters
    if "backoff_jitter" in accepted:  # urllib3 >= 2
        kwargs["backoff_jitter"] = backoff
    if "backoff_max" in accepted:
        kwargs["backoff_max"] = 10.0
    return Retry(**kwargs)


def retrying_session(
    retries: int = 3,
    backoff: float = 0.5,
    *,
    replay: bool,
    verify: Union[bool, str] = True,
    headers: Optional[Mapping[str, str]] = None,
    session: Optional[requests.Session] = None,
) -> requests.Session:
    """A session (``session`` if given, else a new one) with the retry policy mounted for http and https."""
    session = session if session is not None else requests.Session()
    session.verify = verify
    session.headers.update(headers or {})
    adapter = HTTPAdapter(max_retries=retry_policy(retries, backoff, replay=replay))
    for prefix in ("http://", "https://"):
        session.mount(prefix, adapter)
    return session
