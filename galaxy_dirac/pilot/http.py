"""A tiny HTTP client over :mod:`urllib` for the pilot.

Worker nodes have a Python and little else, so the pilot cannot rely on ``requests``. This module gives the rest of
the pilot what it needs and nothing more: JSON calls with a bearer token, timeouts, retries with exponential back-off
and jitter for failures that are worth retrying, an optional CA bundle, raw responses for streaming transfers and a
streaming ``multipart/form-data`` body (output sandboxes and staged outputs can be large, so they are never loaded into
memory).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any, BinaryIO, Callable, Iterable, Mapping, Optional, Sequence, Tuple, Union

log = logging.getLogger(__name__)

USER_AGENT = "galaxy-dirac-pilot/0.1"

#: Status codes after which the same request may succeed later.
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})

_NO_BODY = object()


class HTTPError(Exception):
    """A response with a status code of 400 or more; ``detail`` is the server's explanation when it gave one."""

    def __init__(self, status: int, detail: str, url: str = "", headers: Optional[Mapping[str, str]] = None) -> None:
        super().__init__(f"HTTP {status} from {url}: {detail}" if url else f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail
        self.url = url
        self.headers = dict(headers or {})

    @property
    def retryable(self) -> bool:
        return self.status in RETRYABLE_STATUSES


def is_retryable(exc: BaseException) -> bool:
    """Whether ``exc`` is a transient failure (network trouble, overload) rather than a refusal."""
    if isinstance(exc, HTTPError):
        return exc.retryable
    if isinstance(exc, ssl.SSLCertVerificationError):
        return False
    if isinstance(exc, urllib.error.URLError):
        return not isinstance(exc.reason, ssl.SSLCertVerificationError)
    return isinstance(exc, (OSError, http.client.HTTPException, socket.timeout))


class Backoff:
    """Exponential back-off with jitter, so that many pilots hitting one outage do not retry in lockstep."""

    def __init__(self, base: float = 0.5, cap: float = 30.0, factor: float = 2.0) -> None:
        self.base = base
        self.cap = cap
        self.factor = factor

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based): a random value in [d/2, d]."""
        ceiling = min(self.cap, self.base * (self.factor ** max(attempt, 0)))
        return random.uniform(ceiling / 2.0, ceiling)


def ssl_context(ca_bundle: Optional[str]) -> Optional[ssl.SSLContext]:
    """A verifying TLS context trusting ``ca_bundle`` (a file or a directory of hashed certificates)."""
    if not ca_bundle:
        return None
    if os.path.isdir(ca_bundle):
        return ssl.create_default_context(capath=ca_bundle)
    return ssl.create_default_context(cafile=ca_bundle)


def _error_detail(body: bytes) -> str:
    text = body.decode("utf-8", "replace")
    try:
        detail = json.loads(text).get("detail", text)
    except (ValueError, AttributeError):
        detail = text
    detail = detail if isinstance(detail, str) else json.dumps(detail)
    return detail[:2000]


class Response:
    """A fully read response."""

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8")) if self.body else None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuses redirects of requests that carry a body or a bearer token: both must only go where they were sent."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        if req.data is not None or req.has_header("Authorization"):
            return None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def open_url(
    method: str,
    url: str,
    *,
    data: Union[bytes, BinaryIO, MultipartBody, FileBody, None] = None,
    headers: Optional[Mapping[str, str]] = None,
    timeout: float = 60.0,
    context: Optional[ssl.SSLContext] = None,
) -> http.client.HTTPResponse:
    """One attempt at a request; returns the open response for streaming, raises :class:`HTTPError` on >= 400."""
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("User-Agent", USER_AGENT)
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    handlers: list = [_NoRedirect()]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    try:
        return opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        try:
            body = exc.read()
        except (OSError, http.client.HTTPException):
            body = b""
        finally:
            exc.close()
        raise HTTPError(exc.code, _error_detail(body) or str(exc.reason), redact(url), exc.headers) from None


class Client:
    """JSON client of one server, with a bearer token and retries of transient failures.

    ``sleep`` is injectable so that the pilot can interrupt back-off sleeps when it is told to stop.
    """

    def __init__(
        self,
        base_url: str,
        token: Optional[str] = None,
        *,
        ca_bundle: Optional[str] = None,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: Optional[Backoff] = None,
        sleep: Callable[[float], Any] = time.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self.token = token
        self.ca_bundle = ca_bundle
        self.context = ssl_context(ca_bundle)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff or Backoff()
        self.sleep = sleep

    def url(self, path: str, params: Optional[Mapping[str, Any]] = None) -> str:
        """Absolute URL of ``path`` (absolute URLs are kept), with query ``params`` (sequences repeat the key)."""
        url = urllib.parse.urljoin(self.base_url, path.lstrip("/") if "://" not in path else path)
        if params:
            url += ("&" if "?" in url else "?") + urllib.parse.urlencode(params, doseq=True)
        return url

    def same_origin(self, url: str) -> bool:
        """Whether ``url`` is on this client's server, i.e. may be sent the bearer token."""
        mine = urllib.parse.urlsplit(self.base_url)
        other = urllib.parse.urlsplit(urllib.parse.urljoin(self.base_url, url))
        return (mine.scheme, mine.netloc) == (other.scheme, other.netloc)

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Optional[Mapping[str, Any]] = None,
        json_body: Any = _NO_BODY,
        data: Optional[bytes] = None,
        headers: Optional[Mapping[str, str]] = None,
        retries: Optional[int] = None,
        timeout: Optional[float] = None,
    ) -> Response:
        """Send a request and read the whole response, retrying transient failures ``retries`` times."""
        url = self.url(path, params)
        all_headers = {"Accept": "application/json"}
        if self.token and self.same_origin(url):
            all_headers["Authorization"] = f"Bearer {self.token}"
        if json_body is not _NO_BODY:
            data = json.dumps(json_body).encode("utf-8")
            all_headers["Content-Type"] = "application/json"
        all_headers.update(headers or {})
        attempts = (self.retries if retries is None else retries) + 1
        for attempt in range(attempts):
            try:
                with open_url(
                    method, url, data=data, headers=all_headers, timeout=timeout or self.timeout, context=self.context
                ) as response:
                    return Response(response.status, dict(response.headers.items()), response.read())
            except Exception as exc:
                if not is_retryable(exc) or attempt == attempts - 1:
                    raise
                delay = self.backoff.delay(attempt)
                log.debug("%s %s failed (%s); retrying in %.1f s", method, url, exc, delay)
                self.sleep(delay)
        raise AssertionError("unreachable")

    def call(self, method: str, path: str, body: Any = _NO_BODY, **kwargs: Any) -> Any:
        """JSON in, JSON out; ``None`` for an empty response such as 204."""
        return self.request(method, path, json_body=body, **kwargs).json()


Part = Union[bytes, str]


class MultipartBody:
    """A streaming ``multipart/form-data`` body: form fields, then files read from disk while sending.

    It is re-readable (:meth:`reset`) so that a failed upload can be retried with the same object.
    """

    def __init__(self, fields: Mapping[str, Any], files: Sequence[Tuple[str, str, str]]) -> None:
        """``files`` are ``(field name, file name, path)``; field values are sent as text."""
        self.boundary = "galaxy-dirac-" + uuid.uuid4().hex
        self._parts: list = []
        for name, value in fields.items():
            self._parts.append(self._header(name) + b"\r\n\r\n" + str(value).encode("utf-8") + b"\r\n")
        for name, filename, path in files:
            head = self._header(name, filename) + b"\r\nContent-Type: application/octet-stream\r\n\r\n"
            self._parts.extend([head, path, b"\r\n"])
        self._parts.append(f"--{self.boundary}--\r\n".encode("ascii"))
        self.length = sum(len(p) if isinstance(p, bytes) else os.path.getsize(p) for p in self._parts)
        self.content_type = f"multipart/form-data; boundary={self.boundary}"
        self._index = 0
        self._buffer = b""
        self._file: Optional[BinaryIO] = None

    def _header(self, name: str, filename: Optional[str] = None) -> bytes:
        def quote(text: str) -> str:
            return text.replace("\\", "\\\\").replace('"', '\\"').replace("\r", " ").replace("\n", " ")

        disposition = f'Content-Disposition: form-data; name="{quote(name)}"'
        if filename is not None:
            disposition += f'; filename="{quote(filename)}"'
        return f"--{self.boundary}\r\n".encode("ascii") + disposition.encode("utf-8")

    @property
    def headers(self) -> dict:
        return {"Content-Type": self.content_type, "Content-Length": str(self.length)}

    def reset(self) -> None:
        self.close()
        self._index = 0
        self._buffer = b""

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def read(self, size: int = -1) -> bytes:
        chunks = []
        wanted = size if size is not None and size >= 0 else float("inf")
        got = 0
        while got < wanted and self._index < len(self._parts):
            part = self._parts[self._index]
            if isinstance(part, bytes):
                if not self._buffer:
                    self._buffer = part
                take = self._buffer[: int(min(len(self._buffer), wanted - got))]
                self._buffer = self._buffer[len(take) :]
                if not self._buffer:
                    self._index += 1
            else:
                if self._file is None:
                    self._file = open(part, "rb")  # noqa: SIM115 - kept open across read() calls
                take = self._file.read(int(min(1 << 20, wanted - got)))
                if not take:
                    self.close()
                    self._index += 1
                    continue
            chunks.append(take)
            got += len(take)
        return b"".join(chunks)


class FileBody:
    """A file as a streaming request body with a known length, for ``PUT`` uploads."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.length = os.path.getsize(path)
        self._file: Optional[BinaryIO] = None

    @property
    def headers(self) -> dict:
        return {"Content-Type": "application/octet-stream", "Content-Length": str(self.length)}

    def reset(self) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def read(self, size: int = -1) -> bytes:
        if self._file is None:
            self._file = open(self.path, "rb")  # noqa: SIM115 - kept open across read() calls
        return self._file.read(size)


def upload(
    method: str,
    url: str,
    body: Union[MultipartBody, FileBody],
    *,
    headers: Optional[Mapping[str, str]] = None,
    timeout: float = 300.0,
    context: Optional[ssl.SSLContext] = None,
    retries: int = 4,
    backoff: Optional[Backoff] = None,
    sleep: Callable[[float], Any] = time.sleep,
) -> Response:
    """Stream ``body`` to ``url``, restarting from the beginning after a transient failure."""
    backoff = backoff or Backoff()
    all_headers = dict(body.headers)
    all_headers.update(headers or {})
    for attempt in range(retries + 1):
        body.reset()
        try:
            with open_url(method, url, data=body, headers=all_headers, timeout=timeout, context=context) as response:
                return Response(response.status, dict(response.headers.items()), response.read())
        except Exception as exc:
            if not is_retryable(exc) or attempt == retries:
                raise
            delay = backoff.delay(attempt)
            log.info("upload to %s failed (%s); retrying in %.1f s", redact(url), exc, delay)
            sleep(delay)
        finally:
            body.close()
    raise AssertionError("unreachable")


def redact(url: str) -> str:
    """``url`` without its query string, which may hold a signed ticket or a job key, so that it is safe to log."""
    return urllib.parse.urlsplit(url)._replace(query="", fragment="").geturl()


def iter_chunks(response: http.client.HTTPResponse, size: int = 1 << 20) -> Iterable[bytes]:
    """The body of ``response`` in chunks, raising :class:`http.client.IncompleteRead` on a short body.

    ``HTTPResponse.read(n)`` returns ``b""`` when the peer closes early, so the remaining length is checked here.
    """
    while True:
        chunk = response.read(size)
        if not chunk:
            remaining = getattr(response, "length", None)
            if remaining:
                raise http.client.IncompleteRead(b"", remaining)
            return
        yield chunk
