"""A fault-injecting HTTP proxy on 127.0.0.1 in front of the moto server.

Every request is forwarded to the upstream unless a :class:`Fault` matches it first. Faults:

- ``"slowdown"``: answer ``503 SlowDown`` without forwarding (S3's throttling answer);
- ``"forbid"``: answer ``403 AccessDenied`` without forwarding (a permanent refusal);
- ``"lose"``: forward the request (the upstream does the work), then lose the response: answer
  ``500 InternalError`` (``reply=500``) or drop the connection with no answer (``reply=None``);
- ``"stall"``: hold the request for ``seconds`` before forwarding it (a hung upload);
- ``"hold"``: hold each matching request until ``count`` of them have arrived (or ``seconds``
  passed), then forward them all: a client that sends them one after another waits
  ``seconds`` and never has two in flight; one that sends them concurrently is not slowed.

The proxy logs every request (method, path, query, the action taken, the status returned, the
``Range`` and ``User-Agent`` headers) in
arrival order, and counts UploadPart requests in flight (current and maximum) and the object
GETs in flight for different objects at once (maximum).
"""

from __future__ import annotations

import http.client
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

Action = Literal["slowdown", "forbid", "lose", "stall", "hold"]

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "expect", "te"}
_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "forbid": (403, "AccessDenied", "Access Denied"),
    "lose": (500, "InternalError", "We encountered an internal error. Please try again."),
}


@dataclass
class Fault:
    """One rule: which requests it matches, what it does, how often.

    ``method`` must equal the request's method, ``path`` is a regex searched in the unquoted
    path, ``query`` names a query parameter that must be present (``"partNumber"`` for
    UploadPart, ``"uploads"`` for CreateMultipartUpload). Of the matching requests, every
    ``every``-th is acted on, at most ``times`` times (``None``: no limit).
    """

    action: Action
    method: str | None = None
    path: str | None = None
    query: str | None = None
    every: int = 1
    times: int | None = None
    seconds: float = 0.0
    reply: int | None = 500
    count: int = 2
    matched: int = field(default=0, init=False)
    fired: int = field(default=0, init=False)

    def applies(self, method: str, path: str, query: dict[str, str]) -> bool:
        """Count a matching request and say whether this rule acts on it."""
        if self.method is not None and method != self.method:
            return False
        if self.path is not None and not re.search(self.path, path):
            return False
        if self.query is not None and self.query not in query:
            return False
        self.matched += 1
        if self.matched % self.every or (self.times is not None and self.fired >= self.times):
            return False
        self.fired += 1
        return True


@dataclass
class Request:
    """One logged request: arrival number, method, unquoted path, query, action and status."""

    n: int
    method: str
    path: str
    query: dict[str, str]
    action: str
    status: int | None = None
    range: str | None = None
    """The ``Range`` header (a ranged GET), None without one."""
    agent: str = ""
    """The ``User-Agent`` header (a client's ``user_agent_extra`` tells clients apart)."""

    @property
    def is_upload_part(self) -> bool:
        """True for S3 UploadPart (a PUT carrying ``partNumber`` and ``uploadId``)."""
        return self.method == "PUT" and "partNumber" in self.query and "uploadId" in self.query

    @property
    def is_object_get(self) -> bool:
        """True for S3 GetObject (a GET of ``/bucket/key``, not a listing of the bucket)."""
        return (
            self.method == "GET" and "/" in self.path.strip("/") and "list-type" not in self.query
        )


class FaultProxy:
    """A running proxy: ``endpoint`` to point clients at, ``faults`` to add rules, ``log``."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.faults: list[Fault] = []
        self.log: list[Request] = []
        self.parts_in_flight = 0
        self.max_parts_in_flight = 0
        self.max_objects_read_at_once = 0
        self._gets: list[Request] = []
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def add(self, action: Action, **rule: Any) -> Fault:
        """Add a :class:`Fault` (keyword arguments as its fields); rules are tried in order."""
        fault = Fault(action, **rule)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        """Remove every rule (the log and counters stay)."""
        with self._lock:
            self.faults.clear()

    def requests(self, method: str | None = None, path: str | None = None) -> list[Request]:
        """Logged requests, filtered by exact method and by a regex searched in the path."""
        with self._lock:
            log = list(self.log)
        return [
            r
            for r in log
            if (method is None or r.method == method) and (path is None or re.search(path, r.path))
        ]

    def _admit(self, method: str, raw_path: str) -> tuple[Request, Fault | None]:
        split = urlsplit(raw_path)
        query = {k: v[0] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        path = unquote(split.path)
        with self._lock:
            fault = next((f for f in self.faults if f.applies(method, path, query)), None)
            entry = Request(
                len(self.log) + 1, method, path, query, fault.action if fault else "pass"
            )
            self.log.append(entry)
            if entry.is_upload_part:
                self.parts_in_flight += 1
                self.max_parts_in_flight = max(self.max_parts_in_flight, self.parts_in_flight)
            if entry.is_object_get:
                self._gets.append(entry)
                reading = len({r.path for r in self._gets})
                self.max_objects_read_at_once = max(self.max_objects_read_at_once, reading)
        return entry, fault

    def _release(self, entry: Request) -> None:
        with self._lock:
            if entry.is_upload_part:
                self.parts_in_flight -= 1
            if entry.is_object_get:
                self._gets.remove(entry)

    def _hold(self, fault: Fault) -> None:
        """Wait until ``fault.count`` requests matched it (or ``fault.seconds`` passed)."""
        with self._arrived:
            self._arrived.notify_all()
            self._arrived.wait_for(
                lambda: fault.fired >= fault.count or self._stop.is_set(), fault.seconds
            )

    def forward(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """Send one request upstream; return its status, headers and body."""
        conn = http.client.HTTPConnection(*self.upstream, timeout=300)
        try:
            conn.request(method, path, body=body or None, headers=headers)
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            conn.close()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Wake stalled requests, stop serving, close the socket."""
        self._stop.set()
        with self._arrived:
            self._arrived.notify_all()
        self._server.shutdown()
        self._server.server_close()


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
        chunks: list[bytes] = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0], 16)
            if size == 0:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


_Reply = tuple[int, list[tuple[str, str]], bytes]


def _error(action: str) -> _Reply:
    status, code, message = _ERRORS[action]
    payload = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        "<RequestId>tk-proxy</RequestId></Error>"
    ).encode()
    headers = [("Content-Type", "application/xml"), ("Content-Length", str(len(payload)))]
    return status, headers, payload


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _handle(self) -> None:
            body = _read_body(self)
            entry, fault = proxy._admit(self.command, self.path)
            entry.range = self.headers.get("Range")
            entry.agent = self.headers.get("User-Agent", "")
            try:  # the request stops being in flight once its answer is decided
                reply = self._outcome(body, fault)
            finally:
                proxy._release(entry)
            if reply is None:  # no answer at all: the client sees the connection close
                self.close_connection = True
                return
            entry.status, headers, data = reply
            self.send_response(entry.status)
            for key, value in headers:
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _outcome(self, body: bytes, fault: Fault | None) -> _Reply | None:
            if fault is not None and fault.action in ("slowdown", "forbid"):
                return _error(fault.action)
            if fault is not None and fault.action == "stall" and proxy._stop.wait(fault.seconds):
                return None
            if fault is not None and fault.action == "hold":
                proxy._hold(fault)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            headers["Content-Length"] = str(len(body))
            status, upstream_headers, data = proxy.forward(self.command, self.path, headers, body)
            if fault is not None and fault.action == "lose":
                return None if fault.reply is None else _error("lose")
            length = str(len(data))
            kept = []
            for key, value in upstream_headers:
                if key.lower() == "content-length" and self.command == "HEAD":
                    length = value  # a HEAD answer has no body but tells the object's size
                elif key.lower() not in _HOP_BY_HOP:
                    kept.append((key, value))
            return status, [*kept, ("Content-Length", length)], data

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler


@contextmanager
def fault_proxy(upstream: str) -> Iterator[FaultProxy]:
    """Run a :class:`FaultProxy` in front of ``upstream`` for the duration of the context."""
    proxy = FaultProxy(upstream)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
