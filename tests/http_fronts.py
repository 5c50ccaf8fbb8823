"""HTTP servers on loopback that stand between the client and the fake API, as proxies and CDNs do.

One forwarding server serves every case: a forward proxy (the request's target is absolute),
a reverse proxy in front of the fake (``upstream``), answering gzipped, chunked, or over TLS.
"""

from __future__ import annotations

import gzip
import http.client
import http.server
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit


@dataclass
class Front:
    """What a running front does and saw: ``targets`` lists each request's target as it arrived,
    ``compressed`` those answered gzipped; ``url`` is its own base (scheme, host and port)."""

    upstream: str | None = None  # forward every request here (a reverse proxy); None: a forward proxy
    compress: bool = False  # gzip the answers of requests that accept it
    chunked: bool = False  # answer with Transfer-Encoding: chunked, in chunks of 1000 bytes
    corrupt: int = 0  # the next this many answers say gzip but carry bytes that are not (after forwarding)
    rewrite: dict[str, str] = field(default_factory=dict)  # forward each request's path with these replaced
    targets: list[str] = field(default_factory=list)
    compressed: list[str] = field(default_factory=list)
    url: str = ""


class _Forwarding(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    front: Front

    def do_GET(self) -> None:
        front = self.front
        front.targets.append(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        sent = self.rfile.read(length) if length else None
        path = self.path
        for old, new in front.rewrite.items():
            path = path.replace(old, new)
        target = urlsplit(front.upstream + path if front.upstream else path)
        upstream = http.client.HTTPConnection(target.hostname or "", target.port, timeout=10)
        headers = {name: value for name, value in self.headers.items() if name.lower() != "proxy-connection"}
        headers["Host"] = target.netloc
        headers["Accept-Encoding"] = "identity"
        upstream.request(self.command, f"{target.path}?{target.query}", body=sent, headers=headers)
        answer = upstream.getresponse()
        body = answer.read()
        upstream.close()
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.getheader("Content-Type") or "application/json")
        if front.compress and "gzip" in self.headers.get("Accept-Encoding", ""):
            body = gzip.compress(body)
            self.send_header("Content-Encoding", "gzip")
            front.compressed.append(self.path)
        if front.corrupt > 0:
            front.corrupt -= 1
            body = b"\x1f\x8b not gzip at all"
            self.send_header("Content-Encoding", "gzip")
        if front.chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for start in range(0, len(body), 1000):
                chunk = body[start : start + 1000]
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_PATCH = do_DELETE = do_POST = do_GET

    def log_message(self, *_: object) -> None:
        pass


@contextmanager
def serving(front: Front, *, certificate: tuple[Path, Path] | None = None) -> Iterator[Front]:
    """Serve ``front`` on a free loopback port (over TLS with ``certificate``: its cert and key
    files) until the block ends."""
    handler = type("Handler", (_Forwarding,), {"front": front})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    scheme = "http"
    if certificate is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*certificate)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    front.url = f"{scheme}://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield front
    finally:
        server.shutdown()
        server.server_close()
