"""Errors of the OpenRouter keys API client.

The tree, and what a caller does with each::

    ApiError                    anything the API or the connection did wrong
    ├── TransientError          worth retrying; retried inside the client until the budget runs out
    │   ├── RateLimited         429 (carries Retry-After when the API sent it)
    │   ├── ServerError         5xx but 501 and 505 (a CDN's 52x included)
    │   └── ConnectionFailed    could not connect, or the connection broke
    ├── CertificateRefused      the API's TLS certificate is not trusted (not retried: it will not
    │                           pass by itself; trust its issuer through SSL_CERT_FILE or SSL_CERT_DIR)
    ├── OutcomeUnknown          a PATCH, DELETE or POST sent whose answer was lost (timeout, dropped
    │                           connection, an undecodable body, a 5xx but 503): never re-sent;
    │                           settle it from a fresh GET
    ├── MalformedResponse       a body that is not the documented shape (not retried: a bug or a proxy)
    └── RequestRejected         4xx other than 429, carrying the API's own message
        ├── BadRequest          400
        ├── AuthenticationFailed 401 and 403: the credential is missing, wrong or not a management key
        ├── NotFound            404
        └── Conflict            409

No error ever carries the management key: messages are built from the API's error body, the
method and the path, never from request headers.
"""

from __future__ import annotations


class ApiError(Exception):
    """Base of every error the client raises."""

    status: int | None = None


class TransientError(ApiError):
    """A failure that may pass: retried with backoff inside the client."""

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class RateLimited(TransientError):
    """429 Too Many Requests."""


class ServerError(TransientError):
    """A 5xx answer."""


class ConnectionFailed(TransientError):
    """The API could not be reached or the connection broke."""


class CertificateRefused(ApiError):
    """The API's TLS certificate was refused (self-signed, expired, another host's, an unknown
    issuer): a setting to mend, so it is not retried."""


class OutcomeUnknown(ApiError):
    """A change (PATCH or DELETE) may or may not have been applied: its answer was lost.

    Re-sending it would be a blind repeat of a destructive call, so the client does not retry it;
    the caller reads the key's fresh state to learn what happened.
    """

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status


class MalformedResponse(ApiError):
    """A response body that is not the documented shape."""


class RequestRejected(ApiError):
    """A 4xx answer other than 429, with the API's message."""

    def __init__(self, message: str, *, status: int):
        super().__init__(message)
        self.status = status


class BadRequest(RequestRejected):
    """400."""


class AuthenticationFailed(RequestRejected):
    """401 or 403, or a credential that is not a management key."""


class NotFound(RequestRejected):
    """404: no such key (or workspace)."""


class Conflict(RequestRejected):
    """409."""


_REJECTIONS: dict[int, type[RequestRejected]] = {
    400: BadRequest,
    401: AuthenticationFailed,
    403: AuthenticationFailed,
    404: NotFound,
    409: Conflict,
}


def rejection_for(status: int, message: str) -> RequestRejected:
    """The typed error for a 4xx status (other than 429)."""
    return _REJECTIONS.get(status, RequestRejected)(message, status=status)
