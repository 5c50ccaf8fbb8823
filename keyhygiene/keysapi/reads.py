"""The client's reads over the standard library's ``http.client``, behind httpx's transport interface.

A listing of 100,000 keys is a thousand pages, and the process is bound by its CPU, not by the
API's latency: the threads that fetch the pages share one interpreter lock with the store. httpx's
own transport (httpcore and h11) spends about 1 ms of CPU on each page of 100 keys, most of it in
Python around the bytes; ``http.client`` reads the same page in about 0.4 ms. So the client sends
its GETs through :class:`ReadTransport`, and everything else (every change) through httpx's own
transport; with a proxy configured, everything goes through httpx's.

What stays as with httpx's transport: the request and response objects (an answer's
``Content-Encoding`` is decoded by httpx, as before), httpx's exceptions (``ConnectError``, with
what the system said, and ``ConnectTimeout`` before a request is on the wire; ``WriteTimeout``
while it is sent; ``ReadTimeout``, ``ReadError``, ``RemoteProtocolError`` after; a refused
certificate's ``ssl.SSLCertVerificationError`` as the ``ConnectError``'s cause), TLS verified
against httpx's trust store (certifi, or ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``), the request's
timeouts, and at most ``max_connections`` connections at once, kept alive between requests. A kept
connection that the server closed while it was idle is dropped before it is used; one that turns
out closed when the request is sent on it is replaced by a new one, once, for a GET or HEAD.
"""

from __future__ import annotations

import http.client
import select
import ssl
import threading
from typing import Any

import httpx

_REPEATABLE = frozenset({"GET", "HEAD"})
"""Requests sent again on a new connection when a kept one turns out closed: they change nothing."""
_CLOSED_BEFORE_ANSWER = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)

Origin = tuple[str, str, int]


class ReadTransport(httpx.BaseTransport):
    """httpx's transport interface over ``http.client``, with kept-alive connections (see the module)."""

    def __init__(self, *, max_connections: int) -> None:
        self._slots = threading.BoundedSemaphore(max(1, max_connections))
        self._lock = threading.Lock()
        self._idle: dict[Origin, list[http.client.HTTPConnection]] = {}
        self._tls: ssl.SSLContext | None = None
        self._closed = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        if not self._slots.acquire(timeout=timeouts.get("pool")):
            raise httpx.PoolTimeout("no connection became free in time")
        try:
            return self._send(request, timeouts)
        finally:
            self._slots.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()

    # -- one request -----------------------------------------------------------------------------

    def _send(self, request: httpx.Request, timeouts: dict[str, float | None]) -> httpx.Response:
        url = request.url
        origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        target = url.raw_path.decode("ascii")
        headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in request.headers.raw]
        body = request.read() or None
        while True:
            connection, kept = self._connection(origin, timeouts)
            sent = False  # the whole request is on the wire: a timeout after is the answer's
            try:
                connection.putrequest(request.method, target, skip_host=True, skip_accept_encoding=True)
                for name, value in headers:
                    connection.putheader(name, value)
                _set_timeout(connection, timeouts.get("write"))
                connection.endheaders(body)
                sent = True
                _set_timeout(connection, timeouts.get("read"))
                answer = connection.getresponse()
                content = answer.read()
            except _CLOSED_BEFORE_ANSWER as exc:
                connection.close()
                if kept and request.method in _REPEATABLE:
                    continue  # the server closed the kept connection as we sent on it: try a new one
                closed = f"the connection closed before the answer ({type(exc).__name__})"
                raise httpx.RemoteProtocolError(closed) from None
            except TimeoutError:
                connection.close()
                if not sent:
                    raise httpx.WriteTimeout("the request could not be sent in time") from None
                raise httpx.ReadTimeout("the answer did not come in time") from None
            except http.client.HTTPException as exc:
                connection.close()
                raise httpx.RemoteProtocolError(f"a malformed answer ({type(exc).__name__})") from None
            except OSError as exc:
                connection.close()
                raise httpx.ReadError(f"the connection failed ({type(exc).__name__})") from None
            if answer.will_close:
                connection.close()
            else:
                self._keep(origin, connection)
            return httpx.Response(answer.status, headers=answer.getheaders(), content=content)

    def _connection(self, origin: Origin, timeouts: dict[str, float | None]) -> tuple[http.client.HTTPConnection, bool]:
        """A kept connection to ``origin`` that is still open, else a new one; and whether it was kept."""
        with self._lock:
            kept = self._idle.get(origin, [])
            while kept:
                idle = kept.pop()
                if _still_open(idle):
                    return idle, True
                idle.close()
        scheme, host, port = origin
        connection: http.client.HTTPConnection
        wait = timeouts.get("connect")
        if scheme == "https":
            connection = http.client.HTTPSConnection(host, port, timeout=wait, context=self._context())
        elif scheme == "http":
            connection = http.client.HTTPConnection(host, port, timeout=wait)
        else:
            raise httpx.UnsupportedProtocol(f"cannot send a request to a {scheme!r} URL")
        try:
            connection.connect()
        except TimeoutError:
            connection.close()
            raise httpx.ConnectTimeout("the connection was not made in time") from None
        except ssl.SSLCertVerificationError as exc:  # kept as the cause: the client tells it apart
            connection.close()
            raise httpx.ConnectError(f"the certificate was refused: {exc.verify_message}") from exc
        except OSError as exc:  # refused, unreachable, no such host, a TLS handshake that failed
            connection.close()
            raise httpx.ConnectError(_reason(exc)) from None
        return connection, False

    def _keep(self, origin: Origin, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed:
                self._idle.setdefault(origin, []).append(connection)
                return
        connection.close()

    def _context(self) -> ssl.SSLContext:
        with self._lock:
            if self._tls is None:
                self._tls = httpx.create_ssl_context()
            return self._tls


def _reason(exc: OSError) -> str:
    """What the system said of a failed connection ("Connection refused", "Name or service not
    known", a TLS alert), else the error's type."""
    said = getattr(exc, "reason", None) or exc.strerror  # ssl.SSLError names its reason
    return str(said) if said else type(exc).__name__


def _set_timeout(connection: http.client.HTTPConnection, seconds: float | None) -> None:
    if connection.sock is not None:
        connection.sock.settimeout(seconds)


def _still_open(connection: http.client.HTTPConnection) -> bool:
    """An idle kept connection is readable only when the server closed it (or sent what it should
    not have): either way it cannot carry another request."""
    sock: Any = connection.sock
    if sock is None:
        return False
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return not poller.poll(0)
    except (OSError, ValueError):
        return False
