"""A fault-injecting HTTP proxy in front of an S3 endpoint (moto's server), for tests.

Every request is forwarded unchanged unless the plan for its direction (reads: GET/HEAD; writes:
PUT/POST/DELETE) names a fault for it. A plan is a function ``(key, seen) -> kind | None`` where
``key`` is ``"METHOD /path?query"`` and ``seen`` counts the earlier requests with that key, so the
schedule depends only on what is asked, never on thread timing. Fault kinds:

- ``reset``: read the request, then close the socket with SO_LINGER 0 (the client sees a TCP RST;
  aiohttp quietly resends an idempotent request once, so it takes two resets to reach the caller);
- ``slowdown``: ``503 SlowDown`` with S3's XML error body;
- ``timeout``: read the request and send nothing for ``stall_s`` (longer than the client's read
  timeout), then reset;
- ``truncate``: forward, then cut the response with a reset: after the headers and half the body
  for a read; before any response for a write (it took effect, but the client cannot know);
- ``denied``: ``403 AccessDenied`` with S3's XML error body (a permanent fault).

``injected[(direction, kind)]`` counts the faults actually served.
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

Plan = Callable[[str, int], "str | None"]
READS = frozenset({"GET", "HEAD"})
KINDS = frozenset({"reset", "slowdown", "timeout", "truncate", "denied"})
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "expect", "content-length", "te", "upgrade"})
_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "denied": (403, "AccessDenied", "Access Denied"),
}


def no_faults(key: str, seen: int) -> str | None:
    """The plan that forwards everything."""
    return None


def first(*kinds: str) -> Plan:
    """Each distinct request fails with ``kinds[0]``, then ``kinds[1]``, ..., then passes."""
    _check(kinds)
    return lambda key, seen: kinds[seen] if seen < len(kinds) else None


def always(kind: str) -> Plan:
    """Every request fails with ``kind``: a fault that never ends."""
    _check([kind])
    return lambda key, seen: kind


def seeded(seed: int, rates: dict[str, float], repeats: dict[str, int] | None = None) -> Plan:
    """Each distinct request gets, in the order of ``rates``, each kind whose hash of (seed, kind,
    key) falls below its rate, ``repeats[kind]`` times in a row (default 1); it fails with those
    in turn, then passes. (aiohttp resends an idempotent request once after a reset, so a reset
    meant to reach the caller must come twice.)"""
    _check(rates)
    counts = repeats or {}

    def plan(key: str, seen: int) -> str | None:
        faults = [k for k, rate in rates.items() if _unit(f"{seed}|{k}|{key}") < rate for _ in range(counts.get(k, 1))]
        return faults[seen] if seen < len(faults) else None

    return plan


def _unit(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0**64


def _check(kinds: Iterable[str]) -> None:
    unknown = set(kinds) - KINDS
    if unknown:
        raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {sorted(KINDS)}")


def _error_xml(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<RequestId>faulty-s3</RequestId><HostId>faulty-s3</HostId></Error>").encode()  # fmt: skip


class FaultyS3:
    """The proxy: ``url`` to give the client as ``endpoint_url``; ``reads``/``writes`` plans may be
    changed at any time. Use as a context manager, or ``start()``/``stop()``."""

    def __init__(self, upstream: str, stall_s: float = 2.0) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.stall_s = stall_s
        self.reads: Plan = no_faults
        self.writes: Plan = no_faults
        self.injected: Counter[tuple[str, str]] = Counter()
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.faulty = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="faulty-s3", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultyS3:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes stalled handlers
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultyS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def decide(self, method: str, key: str) -> tuple[str, str | None]:
        """(direction, fault kind or None) for this request, counting it."""
        direction = "read" if method in READS else "write"
        with self._lock:
            seen = self.requests[key]
            self.requests[key] += 1
            kind = (self.reads if direction == "read" else self.writes)(key, seen)
            if kind is not None:
                self.injected[(direction, kind)] += 1
        return direction, kind

    def stall(self) -> None:
        self._stopping.wait(self.stall_s)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._proxy()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _proxy(self) -> None:
        faulty: FaultyS3 = self.server.faulty  # type: ignore[attr-defined]
        body = self._read_body()
        direction, kind = faulty.decide(self.command, f"{self.command} {self.path}")
        if kind in _ERRORS:
            status, code, message = _ERRORS[kind]
            self._respond(status, [("Content-Type", "application/xml")], _error_xml(code, message))
        elif kind in ("reset", "timeout"):
            if kind == "timeout":
                faulty.stall()
            self._reset()
        else:
            status, headers, data = self._forward(faulty.upstream, body)
            if kind == "truncate" and direction == "write":
                self._reset()
            elif kind == "truncate" and self.command != "HEAD" and len(data) > 1:
                self._respond(status, headers, data, send=len(data) // 2)
                self._reset()
            else:
                self._respond(status, headers, data)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self, upstream: tuple[str, int], body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body or None, headers=headers)
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            conn.close()

    def _respond(self, status: int, headers: list[tuple[str, str]], data: bytes, send: int | None = None) -> None:
        self.send_response_only(status)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        if self.command == "HEAD":  # a HEAD's Content-Length describes the object, and no body follows
            length = next((v for k, v in headers if k.lower() == "content-length"), "0")
            self.send_header("Content-Length", length)
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data if send is None else data[:send])
        self.wfile.flush()

    def _reset(self) -> None:
        """Close the connection abruptly: SO_LINGER 0 makes close() send a TCP RST."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.rfile.close()  # holds a reference to the socket; the writer does not (and is flushed later)
        self.connection.close()  # the last reference: the descriptor closes now, with the RST
