"""The client's reads go through ``http.client`` (``keyhygiene.keysapi.reads``), over real sockets.

What a user relies on whatever sends the bytes: kept connections that the server closed are
replaced without failing the listing, chunked and compressed answers are read, TLS certificates
are verified (against SSL_CERT_FILE when set), a connection that breaks is a ConnectionFailed, and
changes never go through it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from keyhygiene.fakeapi import FakeOpenRouter
from keyhygiene.keysapi.client import KeysClient
from keyhygiene.keysapi.errors import CertificateRefused, ConnectionFailed, OutcomeUnknown
from keyhygiene.keysapi.reads import ReadTransport
from tests.conftest import MANAGEMENT_KEY
from tests.http_fronts import Front, serving

PAGE = {
    "data": [{"hash": f"h{index:03d}", "name": f"key {index}", "disabled": False, "usage": 0} for index in range(3)]
}
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


def test_chunked_answers_are_read(fake: FakeOpenRouter, fake_url: str) -> None:
    hashes = {fake.add_key(f"key-{index}")["hash"] for index in range(250)}
    with (
        serving(Front(upstream=fake_url.split("/api/")[0], chunked=True)) as front,
        KeysClient(f"{front.url}/api/v1", MANAGEMENT_KEY, retry_seconds=0) as client,
    ):
        assert set(client.list_all_keys([None]).keys) == hashes


@pytest.mark.parametrize(
    ("body", "raised"),
    [(b"", httpx.ReadTimeout), (b"x" * 64_000_000, httpx.WriteTimeout)],
    ids=["answer-late", "request-stuck"],
)
def test_a_timeout_is_named_for_the_half_of_the_exchange_that_stalled(body: bytes, raised: type[Exception]) -> None:
    """A server that takes the connection and never reads nor answers: a short request waits for
    its answer (ReadTimeout); a request larger than the sockets' buffers cannot be sent (WriteTimeout)."""
    timeouts = {"connect": 5.0, "read": 0.2, "write": 0.2, "pool": 5.0}
    with socket.create_server(("127.0.0.1", 0)) as listener:  # the kernel accepts; nothing reads
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/api/v1/keys"
        request = httpx.Request("POST" if body else "GET", url, content=body, extensions={"timeout": timeouts})
        transport = ReadTransport(max_connections=1)
        with pytest.raises(raised):
            transport.handle_request(request)
        transport.close()


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
    with serving(Front(upstream=fake_url.split("/api/")[0], chunked=True), certificate=certificate) as front:
        yield f"{front.url}/api/v1"


@pytest.mark.parametrize("call", ["read", "change"])
def test_an_untrusted_certificate_is_refused_at_once_saying_why(
    fake: FakeOpenRouter, https_front: str, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    """Reads (``http.client``) and changes (httpx's own transport) alike: no retry, since a
    certificate does not become trusted by waiting, and a message that says what to set."""
    key_hash = fake.add_key("key-0")["hash"]
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with (
        KeysClient(https_front, MANAGEMENT_KEY, retry_seconds=30) as client,
        pytest.raises(CertificateRefused) as raised,
    ):
        if call == "read":
            _page(client)
        else:
            client.update_key(key_hash, disabled=True)
    message = str(raised.value)
    assert f"the TLS certificate of {https_front} is not trusted (self-signed certificate)" in message
    assert "SSL_CERT_FILE" in message
    assert MANAGEMENT_KEY not in message
    assert client.requests_sent == 1
    assert fake.calls == []


def test_a_certificate_trusted_through_ssl_cert_file_is_accepted(
    fake: FakeOpenRouter, https_front: str, certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    key_hash = fake.add_key("key-0")["hash"]
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
    with KeysClient(https_front, MANAGEMENT_KEY, retry_seconds=0) as client:
        assert _page(client) == [key_hash]
