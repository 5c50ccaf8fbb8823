"""The wire side of the fake: routing, authentication, validation, envelopes and error bodies.

:func:`handle` turns one parsed request into one response and knows nothing about sockets, so the
HTTP server stays a thin shell and faults stay in :mod:`keyhygiene.fakeapi.server`.

Choices where the reference leaves room (all **[uncertain]** there):

- ``GET /keys`` with an unknown ``workspace_id`` answers 404 (the spec's newly declared 404).
- ``POST /keys`` with an unknown ``workspace_id`` answers 400: the endpoint declares no 404.
- ``PATCH /keys/{hash}`` moving a key to an unknown workspace answers 404 (not 409).
- A regular key on any ``/keys*`` or ``/workspaces`` endpoint answers 403.
- ``POST /keys`` rejects a negative ``limit`` and an ``expires_at`` that is not in the future.
- A disabled, expired or deleted key's secret gets 401 on ``GET /key``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ._times import parse_expires_at
from .state import LIMIT_RESETS, FakeOpenRouter, UnknownKey, UnknownWorkspace

MESSAGES = {
    400: "Invalid request parameters",
    401: "Missing Authentication header",
    403: "Only management keys can perform this operation",
    404: "Resource not found",
    405: "Method not allowed",
    409: "Resource conflict. Please try again later.",
    429: "Rate limit exceeded",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

_UPDATABLE = ("name", "disabled", "limit", "limit_reset", "include_byok_in_limit", "workspace_id")
_KEY_PATH = re.compile(r"^/keys/([^/]+)$")
_UNSIGNED = re.compile(r"^[0-9]+$")


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str  # below /api/v1, without the query string
    query: dict[str, str]
    authorization: str | None
    body: Any | None = None
    body_error: bool = False  # the body was sent but is not JSON


@dataclass(slots=True)
class Response:
    status: int
    payload: Any
    headers: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        if isinstance(self.payload, bytes):  # already encoded (a page of keys)
            return self.payload
        return json.dumps(self.payload, separators=(",", ":"), allow_nan=False).encode()


class _Problem(Exception):
    def __init__(self, status: int, message: str | None = None) -> None:
        super().__init__(message or MESSAGES.get(status, "Error"))
        self.status = status
        self.message = message or MESSAGES.get(status, "Error")


def error(status: int, message: str | None = None, *, metadata: dict[str, Any] | None = None) -> Response:
    """The standard error body; the HTTP status equals ``error.code``."""
    body: dict[str, Any] = {"code": status, "message": message or MESSAGES.get(status, "Error")}
    if metadata is not None:
        body["metadata"] = metadata
    return Response(status, {"error": body})


def handle(fake: FakeOpenRouter, request: Request) -> Response:
    """Answer one request against the fake's state."""
    try:
        return _route(fake, request)
    except _Problem as problem:
        return error(problem.status, problem.message)


def _route(fake: FakeOpenRouter, request: Request) -> Response:
    path, method = request.path, request.method
    secret = _bearer(request.authorization)
    if secret is None:
        raise _Problem(401)
    credential = fake.credential(secret)
    if credential is None:
        raise _Problem(401, "User not found.")

    if path in ("/key", "/auth/key"):
        if method != "GET":
            raise _Problem(405)
        data = fake.current_key(credential)
        if data is None:
            raise _Problem(401, "User not found.")
        return Response(200, {"data": data})

    match = _KEY_PATH.match(path)
    if path not in ("/keys", "/workspaces") and match is None:
        raise _Problem(404, "Not Found")
    if not credential.is_management:
        raise _Problem(403)

    if path == "/workspaces":
        if method != "GET":
            raise _Problem(405)
        return _list_workspaces(fake, request.query)
    if path == "/keys":
        if method == "GET":
            return _list_keys(fake, request.query)
        if method == "POST":
            return _create_key(fake, request)
        raise _Problem(405)

    assert match is not None
    key_hash = match.group(1)
    try:
        if method == "GET":
            key = fake.get(key_hash)
            if key is None:
                raise UnknownKey(key_hash)
            return Response(200, {"data": fake.render(key)})
        if method == "PATCH":
            return _update_key(fake, key_hash, request)
        if method == "DELETE":
            fake.delete_key(key_hash)
            return Response(200, {"deleted": True})
    except UnknownKey:
        raise _Problem(404) from None
    raise _Problem(405)


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and value else None


def _list_keys(fake: FakeOpenRouter, query: dict[str, str]) -> Response:
    offset = _offset(query)
    include_disabled = _flag(query, "include_disabled")
    include_expired = _flag(query, "include_expired")
    workspace_id = query.get("workspace_id")
    if workspace_id is None:
        workspace_id = fake.default_workspace_id
    elif not fake.has_workspace(workspace_id):
        raise _Problem(404, "Workspace not found")
    # ``limit`` is not a parameter of GET /keys; like unknown parameters it is ignored.
    callback = fake.faults.list_page_callback()
    if callback is not None:
        callback(fake, workspace_id, offset)
    try:
        body = fake.list_page_body(
            workspace_id, offset, include_disabled=include_disabled, include_expired=include_expired
        )
    except UnknownWorkspace:
        raise _Problem(404, "Workspace not found") from None
    past_end = fake.faults.past_end_status
    if past_end is not None and offset > 0 and body.startswith(b'{"data":[]'):
        raise _Problem(past_end, "Offset out of range")
    return Response(200, body)


def _list_workspaces(fake: FakeOpenRouter, query: dict[str, str]) -> Response:
    offset = _offset(query)
    text = query.get("limit", "50")
    if not _UNSIGNED.match(text) or not 1 <= int(text) <= 100:
        raise _Problem(400, "limit must be an integer from 1 to 100")
    workspaces, total = fake.workspace_page(offset, int(text))
    return Response(200, {"data": workspaces, "total_count": total})


def _offset(query: dict[str, str]) -> int:
    text = query.get("offset")
    if text is None:
        return 0
    if not _UNSIGNED.match(text):
        raise _Problem(400, "offset must be a non-negative integer")
    return int(text)


def _flag(query: dict[str, str], name: str) -> bool:
    text = query.get(name)
    if text is None:
        return False
    if text not in ("true", "false"):
        raise _Problem(400, f"{name} must be true or false")
    return text == "true"


def _object_body(request: Request) -> dict[str, Any]:
    if request.body_error:
        raise _Problem(400, "Invalid JSON body")
    body = {} if request.body is None else request.body
    if not isinstance(body, dict):
        raise _Problem(400, "Request body must be a JSON object")
    return body


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_common(body: dict[str, Any]) -> None:
    """Rules shared by POST and PATCH for the fields both accept."""
    if "limit" in body and body["limit"] is not None and not _is_number(body["limit"]):
        raise _Problem(400, "limit must be a number or null")
    if "limit" in body and body["limit"] is not None and body["limit"] < 0:
        raise _Problem(400, "limit must not be negative")
    if "limit_reset" in body and body["limit_reset"] not in (*LIMIT_RESETS, None):
        raise _Problem(400, "limit_reset must be daily, weekly, monthly or null")
    if "include_byok_in_limit" in body and not isinstance(body["include_byok_in_limit"], bool):
        raise _Problem(400, "include_byok_in_limit must be a boolean")
    if "workspace_id" in body and (not isinstance(body["workspace_id"], str) or not body["workspace_id"]):
        raise _Problem(400, "workspace_id must be a string")


def _create_key(fake: FakeOpenRouter, request: Request) -> Response:
    body = _object_body(request)
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise _Problem(400, "name is required and must be a non-empty string")
    _check_common(body)
    expires_at = None
    if body.get("expires_at") is not None:
        text = body["expires_at"]
        expires_at = parse_expires_at(text) if isinstance(text, str) else None
        if expires_at is None:
            raise _Problem(400, "expires_at must be a UTC ISO 8601 time with seconds, like 2026-01-31T12:00:00Z")
        if expires_at <= fake.now():
            raise _Problem(400, "expires_at must be in the future")
    creator = body.get("creator_user_id")
    if creator is not None and (not isinstance(creator, str) or not creator):
        raise _Problem(400, "creator_user_id must be a non-empty string or null")
    external_user = None
    if "external" in body:
        external = body["external"]
        if not isinstance(external, dict) or not isinstance(external.get("user"), str) or not external["user"]:
            raise _Problem(400, "external.user is required and must be a string")
        api_key = external.get("api_key")
        if api_key is not None and (not isinstance(api_key, str) or len(api_key) < 32):
            raise _Problem(400, "external.api_key must be at least 32 characters")
        external_user = external["user"]
    workspace_id = body.get("workspace_id")
    if workspace_id is not None and not fake.has_workspace(workspace_id):
        raise _Problem(400, "Unknown workspace_id")
    try:
        key, secret = fake.create_key(
            name,
            workspace_id=workspace_id,
            limit=body.get("limit"),
            limit_reset=body.get("limit_reset"),
            include_byok_in_limit=bool(body.get("include_byok_in_limit", False)),
            expires_at=expires_at,
            creator_user_id=creator,
            external_user=external_user,
        )
    except UnknownWorkspace:
        raise _Problem(400, "Unknown workspace_id") from None
    return Response(201, {"data": fake.render(key), "key": secret})


def _update_key(fake: FakeOpenRouter, key_hash: str, request: Request) -> Response:
    body = _object_body(request)
    # Unknown fields (expires_at among them) are silently ignored, as the API does.
    changes = {name: body[name] for name in _UPDATABLE if name in body}
    if not changes:
        raise _Problem(400, "No update fields provided")
    if "name" in changes and (not isinstance(changes["name"], str) or not changes["name"]):
        raise _Problem(400, "name must be a non-empty string")
    if "disabled" in changes and not isinstance(changes["disabled"], bool):
        raise _Problem(400, "disabled must be a boolean")
    _check_common(changes)
    try:
        key = fake.update_key(key_hash, changes)
    except UnknownWorkspace:
        raise _Problem(404, "Workspace not found") from None
    return Response(200, {"data": fake.render(key)})
