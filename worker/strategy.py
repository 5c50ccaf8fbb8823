"""The worker's first look at a task message: anything but a well-formed job message is rejected.

Celery already refuses any content type but JSON (a pickled message is never unpickled). What it
does not check is the shape of a JSON body: a body that is not ``[args, kwargs, embed]``, or a
missing ``id`` header, raises inside the worker's main process and stops the worker, and
with late acknowledgement the message is restored and stops the next worker too. This strategy
checks every message before Celery's own and turns a malformed one into InvalidTaskError, which
Celery logs and rejects (the message is dropped, nothing runs).

It also drops a ``timelimit`` header: the time limits are the worker's, ordered against the lock
expiry, and no message may lengthen them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery.exceptions import InvalidTaskError
from celery.worker.strategy import default

EMBED_CALLBACKS = ("callbacks", "errbacks", "chain", "chord")


def checked(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
    """Celery's default strategy for ``task``, behind the message checks."""
    handle = default(task, app, consumer, **kwargs)

    def task_message_handler(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **rest: Any) -> Any:
        check_message(message.headers, message.payload if body is None else None, v1=body is not None)
        message.headers.pop("timelimit", None)
        return handle(message, body, ack, reject, callbacks, **rest)

    return task_message_handler


def check_message(headers: Any, payload: Any, *, v1: bool = False) -> None:
    """Raise InvalidTaskError unless this is a protocol 2 job message with JSON-shaped arguments.

    Decoding ``payload`` (``message.payload``) raises ContentDisallowed or DecodeError for a
    non-JSON or broken body; Celery handles both by rejecting the message.
    """
    if v1:
        raise InvalidTaskError("task message protocol 1 is not accepted")
    if not isinstance(headers, dict):
        raise InvalidTaskError("task message headers are not a mapping")
    task_id = headers.get("id")
    if not isinstance(task_id, str) or not task_id or len(task_id) > 64:
        raise InvalidTaskError("task message has no usable id")
    if not (isinstance(payload, list | tuple) and len(payload) == 3):
        raise InvalidTaskError("task message body is not [args, kwargs, embed]")
    args, kwargs, embed = payload
    if not isinstance(args, list | tuple):
        raise InvalidTaskError("task message args are not a list")
    if not isinstance(kwargs, dict):
        raise InvalidTaskError("task message kwargs are not a mapping")
    if embed is not None and not isinstance(embed, dict):
        raise InvalidTaskError("task message embed is not a mapping")
    if embed and any(embed.get(name) for name in EMBED_CALLBACKS):
        # A job is one job: no message may chain other tasks onto it.
        raise InvalidTaskError("task message carries callbacks, which job tasks do not take")
