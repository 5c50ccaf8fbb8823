"""A webhook receiver on 127.0.0.1 that records what it is sent: the demo's and the tests' notify target.

It answers 200 by default; ``status`` makes it answer with another code, ``hang`` makes it hold
each request until it is closed (or the client gives up), as a stuck receiver would, and ``drip``
makes it send its answer's status line and headers one byte every ``drip`` seconds. Its URL carries
a random token, as real webhook URLs do, so tests can check that the URL never leaks.
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True, slots=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class WebhookSink:
    """``with WebhookSink() as sink``: ``sink.url`` is a secret-looking URL; ``sink.received`` what came."""

    def __init__(self) -> None:
        self.token = f"hook-{uuid.uuid4().hex}"
        self.received: list[Received] = []
        self.status = 200
        self.hang = False
        self.drip: float | None = None
        self._release = threading.Event()
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                with sink._lock:
                    sink.received.append(Received(self.path, dict(self.headers.items()), body))
                if sink.hang:
                    sink._release.wait(timeout=60)
                    return
                if sink.drip is not None:
                    self._drip(sink.drip)
                    return
                self.send_response(sink.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def _drip(self, seconds: float) -> None:
                head = f"HTTP/1.1 {sink.status} Dripping\r\nContent-Length: 2\r\n\r\n".encode()
                try:
                    for index in range(len(head)):
                        self.wfile.write(head[index : index + 1])
                        self.wfile.flush()
                        if sink._release.wait(timeout=seconds):
                            return
                    self.wfile.write(b"ok")
                except OSError:  # the client gave up and closed the connection
                    pass
                self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the receiver's own access log is not what a test or the demo shows."""

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="webhook-sink", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/services/{self.token}"

    def bodies(self) -> list[Any]:
        with self._lock:
            return [item.json for item in self.received]

    def __enter__(self) -> WebhookSink:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()
