"""Exit codes of the interface, and the errors that map onto them.

``0`` success · ``1`` failure (API, database, broker) · ``2`` bad usage or invalid settings or
rules · ``3`` enforcement refused by a safety limit (nothing changed).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3


class KeyhygieneError(Exception):
    """An error with a one-line message for the operator and an exit code."""

    exit_code = EXIT_FAILURE


class UsageError(KeyhygieneError):
    """Bad usage, settings or rules: exit 2."""

    exit_code = EXIT_USAGE


class NotAManagementKey(UsageError):
    """The configured credential is not a management key (or the API rejected it)."""


class DatabaseFailure(KeyhygieneError):
    """The database could not be reached, was locked, or is not at the newest schema."""


class BrokerFailure(KeyhygieneError):
    """The Celery broker (Redis) could not be reached."""


class EnforcementRefused(KeyhygieneError):
    """A safety limit refused the whole enforcement: exit 3, nothing changed.

    ``result`` is the enforcement's own account (what it planned), where it got that far.
    """

    exit_code = EXIT_REFUSED

    def __init__(self, message: str, result: object = None) -> None:
        super().__init__(message)
        self.result = result
