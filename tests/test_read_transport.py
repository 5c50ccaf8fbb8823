"""The client's reads go through ``http.client`` (``keyhygiene.keysapi.reads``), over real sockets.

What a user relies on whatever sends the bytes: kept connections that the server closed are
replaced without failing the listing, chunked and compressed answers are read, TLS certificates
are verified (against SSL_CERT_FILE when set), a connection that breaks is a ConnectionFailed, and
changes never go through it.
"""

from __future__ import annotations

import http.server
import json
import socket
import ssl
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from keyhygiene.fakeapi import FakeOpenRouter
from keyhygiene.keysapi.client import KeysClient
from keyhygiene.keysapi.errors import ConnectionFailed, OutcomeUnknown
from tests.conftest import MANAGEMENT_KEY

PAGE = {"data": [{"hash": f"h{index:03d}", "name": f"key {index}"} for index in range(3)]}
BODY = json.dumps(PAGE).encode()


class _Scripted:
    """A raw HTTP/1.1 server on loopback. ``script`` maps (connection number, request number on it),
    both from 1, to what that request gets: "answer-then-close" (200 with keep-alive advertised,
    then the socket is closed) or "close" (closed unanswered); any other request is answered 200
    and the connection kept. ``requests`` lists each request as it arrived, before its answer."""

    def __init__(self, script: dict[tuple[int, int], str]) -> None:
        self.script = script
        self.requests: list[tuple[int, int]] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        number = 0
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            number += 1
            threading.Thread(target=self._talk, args=(connection, number), daemon=True).start()

    def _talk(self, connection: socket.socket, number: int) -> None:
        reader = connection.makefile("rb")
        request = 0
        with connection:
            while True:
                line = reader.readline()
                if not line:
                    return
                while reader.readline() not in (b"\r\n", b""):
                    pass
                request += 1
                self.requests.append((number, request))
                what = self.script.get((number, request), "answer")
                if what == "close":
                    return
                head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
                connection.sendall(head.encode() + BODY)
                if what == "answer-then-close":
                    return

    def __enter__(self) -> _Scripted:
        return self

    def __exit__(self, *_: object) -> None:
        self._listener.close()


def _client(server: _Scripted, retry_seconds: float = 0) -> KeysClient:
    return KeysClient(f"http://127.0.0.1:{server.port}/api/v1", MANAGEMENT_KEY, retry_seconds=retry_seconds)


def _page(client: KeysClient) -> list[str]:
    return [item["hash"] for item in client.list_key_objects(workspace_id=None, offset=0)]


def test_a_kept_connection_the_server_closed_while_idle_is_replaced() -> None:
    with _Scripted({(1, 1): "answer-then-close"}) as server, _client(server) as client:
        assert _page(client) == ["h000", "h001", "h002"]
        assert _page(client) == ["h000", "h001", "h002"]
    assert server.requests == [(1, 1), (2, 1)]


def test_a_kept_connection_closed_as_the_request_went_out_is_replaced_once() -> None:
    """A server may close a kept connection just as the next request is sent on it: the GET is
    sent again on a new connection, without the client's retry budget (here none)."""
    with _Scripted({(1, 2): "close"}) as server, _client(server) as client:
        assert _page(client) == ["h000", "h001", "h002"]
        assert _page(client) == ["h000", "h001", "h002"]
    assert server.requests == [(1, 1), (1, 2), (2, 1)]


def test_a_new_connection_closed_unanswered_is_a_connection_failure() -> None:
    with (
        _Scripted({(1, 1): "close"}) as server,
        _client(server) as client,
        pytest.raises(ConnectionFailed, match="connection broke before the answer") as raised,
    ):
        _page(client)
    assert MANAGEMENT_KEY not in str(raised.value)
    assert server.requests == [(1, 1)]


def test_changes_never_go_through_the_read_transport() -> None:
    """A change goes through httpx's own transport, on its own connection; one whose connection
    closes unanswered is in doubt, and never sent again."""
    with _Scripted({(2, 1): "close"}) as server, _client(server, retry_seconds=5) as client:
        assert _page(client) == ["h000", "h001", "h002"]  # a read, on connection 1, kept
        with pytest.raises(OutcomeUnknown):
            client.update_key("h000", disabled=True)
    assert server.requests == [(1, 1), (2, 1)]


class _ChunkingFront(http.server.BaseHTTPRequestHandler):
    """In front of the fake API: answers with ``Transfer-Encoding: chunked``, in small chunks."""

    protocol_version = "HTTP/1.1"
    upstream: ClassVar[str] = ""

    def do_GET(self) -> None:
        upstream = urllib.request.Request(
            self.upstream + self.path, headers={"Authorization": self.headers["Authorization"]}
        )
        with urllib.request.urlopen(upstream, timeout=10) as answer:  # loopback
            body = answer.read()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for start in range(0, len(body), 1000):
            chunk = body[start : start + 1000]
            self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *_: object) -> None:
        pass


def test_chunked_answers_are_read(fake: FakeOpenRouter, fake_url: str) -> None:
    hashes = {fake.add_key(f"key-{index}")["hash"] for index in range(250)}
    _ChunkingFront.upstream = fake_url.split("/api/")[0]
    front = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ChunkingFront)
    threading.Thread(target=front.serve_forever, daemon=True).start()
    try:
        with KeysClient(
            f"http://127.0.0.1:{front.server_address[1]}/api/v1", MANAGEMENT_KEY, retry_seconds=0
        ) as client:
            assert set(client.list_all_keys([None]).keys) == hashes
    finally:
        front.shutdown()
        front.server_close()


# -- TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl), and its private key."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def https_front(fake_url: str, certificate: tuple[Path, Path]) -> Iterator[str]:
    """The fake API behind TLS, with the self-signed certificate: its base URL."""
    _ChunkingFront.upstream = fake_url.split("/api/")[0]
    front = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ChunkingFront)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    front.socket = context.wrap_socket(front.socket, server_side=True)
    threading.Thread(target=front.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{front.server_address[1]}/api/v1"
    front.shutdown()
    front.server_close()


def test_an_untrusted_certificate_is_refused(
    fake: FakeOpenRouter, https_front: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.add_key("key-0")
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with (
        KeysClient(https_front, MANAGEMENT_KEY, retry_seconds=0) as client,
        pytest.raises(ConnectionFailed, match="cannot reach the API"),
    ):
        _page(client)


def test_a_certificate_trusted_through_ssl_cert_file_is_accepted(
    fake: FakeOpenRouter, https_front: str, certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    key_hash = fake.add_key("key-0")["hash"]
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
    with KeysClient(https_front, MANAGEMENT_KEY, retry_seconds=0) as client:
        assert _page(client) == [key_hash]
