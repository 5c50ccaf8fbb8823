"""The fake served over real HTTP on loopback, with faults applied at the socket.

Standard library only: a :class:`http.server.ThreadingHTTPServer` with daemon handler threads and
HTTP/1.1 keep-alive, running ``serve_forever`` in a background thread.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .api import Request, Response, error, handle
from .faults import Fault
from .state import Call, FakeOpenRouter

API_PREFIX = "/api/v1"

_HTML_ERROR = (
    b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head>"
    b"<body><h1>502 Bad Gateway</h1><p>cloudflare</p></body></html>"
)


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], fake: FakeOpenRouter) -> None:
        self.fake = fake
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away before its answer was written (its read timed out, it was
        interrupted) is normal traffic, as for a real server: no traceback on stderr."""
        if isinstance(sys.exc_info()[1], BrokenPipeError | ConnectionResetError):
            return
        super().handle_error(request, client_address)

    def close_open_connections(self) -> None:
        with self.sockets_lock:
            sockets = list(self.open_sockets)
        for sock in sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = 120
    server: _HttpServer

    def setup(self) -> None:
        super().setup()
        with self.server.sockets_lock:
            self.server.open_sockets.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.sockets_lock:
                self.server.open_sockets.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: request logs would be noise in tests and benchmarks."""

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def _handle(self, method: str) -> None:
        fake = self.server.fake
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        raw_body = self.rfile.read(length) if length > 0 else b""
        fake.request_started()
        try:
            self._answer(fake, method, raw_body)
        finally:
            fake.request_finished()

    def _answer(self, fake: FakeOpenRouter, method: str, raw_body: bytes) -> None:
        url = urlsplit(self.path)
        full_path = url.path.rstrip("/") or "/"
        # A path outside the API gets a "!" mark and is answered 404 below.
        path = full_path[len(API_PREFIX) :] or "/" if full_path.startswith(API_PREFIX) else f"!{full_path}"
        query = {name: values[-1] for name, values in parse_qs(url.query, keep_blank_values=True).items()}
        body: Any | None = None
        body_error = False
        if raw_body:
            try:
                body = json.loads(raw_body)
            except ValueError:
                body, body_error = raw_body.decode("utf-8", "replace"), True

        delay = fake.faults.delay()
        if delay > 0:
            time.sleep(delay)

        fault = fake.faults.take(method, path)
        record = Call(method=method, path=path, query=query, body=body, status=0)
        if fault is not None and not fault.after_processing:
            if fault.kind == "drop_connection":
                fake.record_call(record)
                self._drop()
                return
            if fault.kind in ("rate_limit", "server_error"):
                response = self._fault_response(fault)
                fake.record_call(_with_status(record, response.status))
                self._send(response.status, response.encode(), response.headers)
                return
            if fault.kind == "malformed":
                fake.record_call(_with_status(record, 200))
                self._send(200, _HTML_ERROR, {}, content_type="text/html; charset=utf-8")
                return

        request = Request(
            method=method,
            path=path,
            query=query,
            authorization=self.headers.get("Authorization"),
            body=None if body_error else body,
            body_error=body_error,
        )
        response = handle(fake, request) if not path.startswith("!") else error(404, "Not Found")
        fake.record_call(_with_status(record, response.status))
        if fault is not None and fault.kind == "drop_connection":
            self._drop()
            return
        if fault is not None and fault.kind == "server_error":  # after the request took effect
            answer = self._fault_response(fault)
            self._send(answer.status, answer.encode(), answer.headers)
            return
        payload = response.encode()
        if fault is not None and fault.kind == "slow_answer":
            time.sleep(fault.delay)
        if fault is not None and fault.kind == "drop_mid_body":
            self._send(response.status, payload, response.headers, cut_after=len(payload) // 2)
            self._drop()
            return
        if fault is not None and fault.kind == "truncated":
            payload = payload[: len(payload) // 2]
        self._send(response.status, payload, response.headers)

    @staticmethod
    def _fault_response(fault: Fault) -> Response:
        if fault.kind == "rate_limit":
            response = error(429, metadata={"error_type": "rate_limit_exceeded"})
        else:
            response = error(fault.status)
        if fault.retry_after is not None:
            seconds = fault.retry_after
            if isinstance(seconds, str):
                response.headers["Retry-After"] = seconds
            else:
                response.headers["Retry-After"] = str(int(seconds)) if seconds == int(seconds) else f"{seconds:g}"
        return response

    def _send(
        self,
        status: int,
        payload: bytes,
        headers: dict[str, str],
        *,
        content_type: str = "application/json",
        cut_after: int | None = None,
    ) -> None:
        """Answer; with ``cut_after``, the headers announce the whole payload but only that many bytes follow."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload if cut_after is None else payload[:cut_after])
        self.wfile.flush()

    def _drop(self) -> None:
        self.close_connection = True
        with suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


def _with_status(call: Call, status: int) -> Call:
    return Call(method=call.method, path=call.path, query=call.query, body=call.body, status=status)


class FakeServer:
    """The fake on a loopback port, for use outside a ``with`` block.

    ``start()`` binds and serves in a daemon thread; ``base_url`` is then like
    ``http://127.0.0.1:54321/api/v1``; ``stop()`` shuts down and closes open connections.
    """

    def __init__(self, fake: FakeOpenRouter, host: str = "127.0.0.1", port: int = 0) -> None:
        self.fake = fake
        self._address = (host, port)
        self._server: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("the fake server is not running")
        host, port = self._server.server_address[:2]
        host_text = host.decode() if isinstance(host, bytes) else str(host)
        if ":" in host_text:
            host_text = f"[{host_text}]"
        return f"http://{host_text}:{port}{API_PREFIX}"

    def start(self) -> str:
        """Start serving and return the base URL."""
        if self._server is not None:
            raise RuntimeError("the fake server is already running")
        self._server = _HttpServer(self._address, self.fake)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self._thread.name = "fakeapi-server"
        self._thread.start()
        return self.base_url

    def stop(self) -> None:
        """Stop serving; idempotent."""
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.close_open_connections()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> FakeServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextmanager
def serve(fake: FakeOpenRouter, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``fake`` on ``host:port`` (0 picks a free port) and yield the base URL."""
    server = FakeServer(fake, host, port)
    base_url = server.start()
    try:
        yield base_url
    finally:
        server.stop()
