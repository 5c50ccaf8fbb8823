"""Structured logging, configured once per process.

``KEYHYGIENE_LOG_FORMAT``: ``json`` (one JSON object per line on stderr), ``console`` (readable
lines), or ``auto`` (the default): console when stderr is a terminal, JSON otherwise.
Every event, exception and third-party log line (Celery, kombu, httpx) passes through the same
processors, the last of which removes the management key and anything shaped like an OpenRouter
secret, so no line can carry one.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any, TextIO, cast

import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import EventDict, Processor, WrappedLogger

from .visible import escape_control

REDACTED = "[REDACTED]"
# A real secret is sk-or-v1- followed by 64 hex characters; key labels (sk-or-v1-abc...123) are
# previews with only a few characters and are left alone.
_SECRET_PATTERN = re.compile(r"sk-or-v1-[A-Za-z0-9_-]{12,}")
_secrets: set[str] = set()
_ordered: list[str] = []


def secret_forms(value: str) -> list[str]:
    """``value`` as a message may quote it, longest first: as it is, and escaped as Python's repr
    and JSON escape it (a secret holding a backslash or a quote is printed otherwise than it is)."""
    forms = {value, repr(value)[1:-1], json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]}
    # Quoted inside a longer value, repr picks its quotes for the whole of it: either may be escaped.
    escaped = value.replace("\\", "\\\\")
    forms.update(escaped.replace(quote, "\\" + quote) for quote in ("'", '"'))
    return sorted(forms, key=len, reverse=True)


def register_secret(value: str | None) -> None:
    """Make sure ``value`` never appears in any log line of this process, in any of its forms."""
    global _ordered
    if value and len(value) >= 4:
        _secrets.update(form for form in secret_forms(value) if len(form) >= 4)
        _ordered = sorted(_secrets, key=len, reverse=True)


def redact_text(text: str) -> str:
    """``text`` with every registered secret and every OpenRouter-shaped secret removed."""
    for secret in _ordered:  # longest first: one secret's escaped form may hold another form
        if secret in text:
            text = text.replace(secret, REDACTED)
    return _SECRET_PATTERN.sub("sk-or-v1-" + REDACTED, text)


def redact_value(value: Any) -> Any:
    """``value`` (text, or a structure of JSON's values) with every secret removed from its text."""
    return _redact(value)


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {key: _redact(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_redact(item) for item in value)
    if isinstance(value, int | float | bool) or value is None:
        return value
    return redact_text(repr(value))


# Left as they are: the exception still to be rendered (redacted once it is text) and the
# formatter's own bookkeeping.
_PASS_THROUGH = frozenset({"exc_info", "_record", "_from_structlog"})


def _visible(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Readable lines go to a terminal as they are: a key's name (the API's to give) with control
    characters in it would drive the terminal (colours, a cleared screen, a line that seems another
    one). Each text value is shown with them escaped, as the tables show names; JSON escapes its own."""
    return {name: _shown(name, value) for name, value in event_dict.items()}


def _shown(name: str, value: Any) -> Any:
    if not isinstance(value, str) or name in _PASS_THROUGH:
        return value
    if name in ("exception", "stack"):  # a traceback keeps its lines
        return "\n".join(escape_control(line) for line in value.split("\n"))
    return escape_control(value)


def redact_secrets(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """structlog processor: scrub secrets from every value of the event, tracebacks included."""
    return {key: value if key in _PASS_THROUGH else _redact(value) for key, value in event_dict.items()}


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
    ]


class _CurrentStderr:
    """Whatever ``sys.stderr`` is at the moment of writing, so that a progress bar that redirects
    stderr (rich does) prints log lines above itself instead of through it."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


_configured_format: str | None = None


def logs_are_json() -> bool:
    """Whether the log lines are JSON (``configure_logging``): then every line on stderr must be."""
    return _configured_format == "json"


def configured_format() -> str | None:
    """``json`` or ``console`` as ``configure_logging`` last chose; None before it ran."""
    return _configured_format


def resolve_format(log_format: str, stream: TextIO | None = None) -> str:
    """``json`` or ``console``: ``auto`` is console when ``stream`` (default stderr) is a terminal."""
    if log_format != "auto":
        return log_format
    try:
        interactive = (stream or sys.stderr).isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        interactive = False
    return "console" if interactive else "json"


def configure_logging(log_format: str = "auto", *, stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """Send structlog's and the standard library's log lines to ``stream`` (default: the current
    stderr) in one format (``auto``: see :func:`resolve_format`)."""
    global _configured_format
    log_format = _configured_format = resolve_format(log_format, stream)
    stream = stream or cast(TextIO, _CurrentStderr())
    shared = _shared_processors()
    final: list[Processor]
    if log_format == "console":
        final = [
            structlog.processors.format_exc_info,
            redact_secrets,
            _visible,
            structlog.dev.ConsoleRenderer(colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback),
        ]
    else:
        final = [
            # No local variables in tracebacks: they would put whatever a frame held (URLs with
            # passwords, request headers) into the log, beyond what redaction can recognise.
            structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False)),
            redact_secrets,
            structlog.processors.JSONRenderer(),
        ]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    # A library's warning (SQLAlchemy's, say) is a log line too: in the same format, not raw text.
    logging.captureWarnings(True)
    # httpx logs every request at INFO; the client logs what matters itself.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.processors.StackInfoRenderer(),
            # Also here, not only in the formatter: any other handler on the root logger (pytest's
            # log capture, an operator's own) receives the event already scrubbed.
            redact_secrets,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def get_logger(name: str | None = None) -> Any:
    """A structlog logger; ``name`` is usually the module's ``__name__``."""
    return structlog.get_logger(name)


def bind(**values: Any) -> None:
    """Bind context (run_id, task_id, ...) to every following log line of this thread."""
    structlog.contextvars.bind_contextvars(**values)


def unbind(*names: str) -> None:
    structlog.contextvars.unbind_contextvars(*names)


def clear() -> None:
    structlog.contextvars.clear_contextvars()
