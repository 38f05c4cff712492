"""A real HTTP reverse proxy on loopback that loses answers on purpose, like a gateway timing out.

It forwards every request to the upstream server unchanged, except that a queued fault for a (method, path) is
applied once: `drop_after` forwards the request and then closes the client's connection without an answer (the
server did the work, the client never hears of it), `504_after` forwards and answers 504, `drop_before` and
`503_before` never forward. `log` records (method, path, forwarded) for every request seen.
"""

from __future__ import annotations

import http.client
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple

FAULTS = ("drop_after", "504_after", "drop_before", "503_before")
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade", "te", "trailer"}
#: Reply headers the proxy sets itself.
_DROP_REPLY = _HOP | {"content-length", "date", "server"}


class FlakyProxy:
    """``with FlakyProxy(upstream) as proxy: proxy.fail("POST", "/api/jobs/jdl", "drop_after")``; use ``proxy.url``."""

    def __init__(self, upstream: str) -> None:
        parts = urllib.parse.urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.faults: Dict[Tuple[str, str], List[str]] = {}
        self.log: List[Tuple[str, str, bool]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread: Optional[threading.Thread] = None

    def fail(self, method: str, path: str, *faults: str) -> None:
        """Queue faults for the next requests to ``path`` (without query string), one request each."""
        assert all(f in FAULTS for f in faults), faults
        with self.lock:
            self.faults.setdefault((method, path), []).extend(faults)

    def seen(self, method: str, path: str) -> List[bool]:
        """For each request to ``path``: whether it reached the upstream."""
        return [forwarded for m, p, forwarded in self.log if (m, p) == (method, path)]

    def _next_fault(self, method: str, path: str) -> Optional[str]:
        with self.lock:
            queue = self.faults.get((method, path))
            return queue.pop(0) if queue else None

    def _handler(self) -> type:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection: a drop is unambiguous

            def _proxy(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                path = urllib.parse.urlsplit(self.path).path
                fault = proxy._next_fault(self.command, path)
                forwarded = fault not in ("drop_before", "503_before")
                with proxy.lock:
                    proxy.log.append((self.command, path, forwarded))
                if fault == "drop_before":
                    self.close_connection = True
                    return
                if fault == "503_before":
                    self._answer(503, [("Retry-After", "0")], b"unavailable")
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    upstream = conn.getresponse()
                    data = upstream.read()
                    reply = [(k, v) for k, v in upstream.getheaders() if k.lower() not in _DROP_REPLY]
                    status = upstream.status
                finally:
                    conn.close()
                if fault == "drop_after":
                    self.close_connection = True
                    return
                if fault == "504_after":
                    self._answer(504, [], b"gateway timeout")
                    return
                self._answer(status, reply, data)

            def _answer(self, status: int, headers: List[Tuple[str, str]], data: bytes) -> None:
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _proxy  # noqa: N815

            def log_message(self, fmt: str, *args: Any) -> None:
                pass

        return Handler

    def __enter__(self) -> FlakyProxy:
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
