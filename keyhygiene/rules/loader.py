"""Read a rules file (TOML) into a ``RuleSet``, or stop with a ``RulesError`` naming file, line and field.

``tomllib`` reports a line only for syntax errors. For a value that parses but is wrong, the line is
found by scanning the text (``_Layout``): the table the value belongs to (``[safety]`` or the N-th
``[[rule]]``) and then the first line inside it that assigns the field; the table's header line
when the field is not written there (a missing required option, or an inline table).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import stat
import sys
import tomllib
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn, cast

from keyhygiene.timeutil import TimeFormatError, parse_duration

from .model import (
    ACTIONS,
    DEFAULT_GRACE,
    INVISIBLE,
    MATCHES,
    NOTIFY_EVENTS,
    NOTIFY_FORMATS,
    WINDOWS,
    NotifyTarget,
    Rule,
    RulesError,
    RuleSet,
    Safety,
)

MAX_RULES_BYTES = 1024 * 1024
MAX_NOTIFY_NAME = 128
"""Characters a notify target's name may have: the notices table stores it."""
MAX_THRESHOLD_USD = 10**12
"""The largest threshold_usd: a trillion dollars, far beyond any key's spend, and within what the
store's amounts (micro-dollars in 64 bits) and the plan's descriptions can hold."""
_TOP_LEVEL = ("safety", "rule", "notify")
NOTIFY_KEYS = ("name", "url_env", "format", "secret_env", "on", "upcoming_within")
SAFETY_KEYS = ("dry_run", "max_actions_per_run", "max_action_percent", "protect_hashes", "protect_names")
RULE_KEYS = (
    "name",
    "match",
    "action",
    "grace",
    "idle_for",
    "window",
    "threshold_usd",
    "reenable",
    "names",
    "exclude_names",
    "workspaces",
    "min_age",
    "disabled",
)


def load_rules(path: str | Path) -> RuleSet:
    """Read and check the rules file at ``path``; a missing or unreadable file is a ``RulesError``."""
    source = str(path)
    try:
        # Checked before opening: opening a FIFO blocks, and /dev/zero never ends.
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise RulesError(source, None, None, "cannot read the rules file: it is not a regular file")
        with open(path, "rb") as file:
            data = file.read(MAX_RULES_BYTES + 1)
    except OSError as exc:
        raise RulesError(source, None, None, f"cannot read the rules file: {exc.strerror or exc}") from None
    if len(data) > MAX_RULES_BYTES:
        raise RulesError(source, None, None, "cannot read the rules file: it is larger than 1 MiB")
    try:
        # utf-8-sig: a byte-order mark from a Windows editor is not a mistake worth stopping for.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise RulesError(source, line, None, "the file is not UTF-8 text") from None
    return parse_rules(text, source)


def parse_rules(text: str, source: str = "<rules>") -> RuleSet:
    """Check the text of a rules file and build its ``RuleSet``. An empty file is valid: no rules."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line, message = _syntax_error_position(str(exc), text)
        raise RulesError(source, line, None, f"invalid TOML: {message}") from None
    except RecursionError:  # tomllib reads nested arrays and inline tables by recursion
        raise RulesError(source, _deepest_line(text), None, "invalid TOML: arrays or tables nested too deep") from None
    except ValueError as exc:  # int() refuses a number of thousands of digits
        line = _longest_number_line(text)
        message = "a number with too many digits to read" if line is not None else str(exc)
        raise RulesError(source, line, None, f"invalid TOML: {message}") from None
    return _Reader(source, _Layout(text)).ruleset(data)


_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")
_TOML_AT_END = re.compile(r"\s*\(at end of document\)\s*$")


def _syntax_error_position(message: str, text: str) -> tuple[int | None, str]:
    found = _TOML_POSITION.search(message)
    if found is not None:
        return int(found.group(1)), f"{message[: found.start()]} (column {found.group(2)})"
    found = _TOML_AT_END.search(message)
    if found is not None:
        return max(1, len(_lines(text))), f"{message[: found.start()]} (at the end of the file)"
    return None, message


def _lines(text: str) -> list[str]:
    """The lines of a TOML text as TOML counts them: ended by LF or CRLF only. (``str.splitlines``
    also breaks at U+2028, U+0085 and others, which TOML allows in comments and strings.)"""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


# --- where things are written -------------------------------------------------------------------

_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEY_HASH = re.compile(r"[0-9a-f]{64}")
_ARRAY_HEADER = re.compile(r"^\s*\[\[\s*(?P<path>[^\[\]]+?)\s*\]\]\s*(#.*)?$")
_TABLE_HEADER = re.compile(r"^\s*\[\s*(?P<path>[^\[\]]+?)\s*\]\s*(#.*)?$")
_ASSIGNMENT = re.compile(r"""^\s*(?P<key>"(?:[^"\\]|\\.)*"|'[^']*'|[A-Za-z0-9_-]+)\s*[.=]""")
_KEY_PART = re.compile(r"""\s*("(?:[^"\\]|\\.)*"|'[^']*'|[A-Za-z0-9_-]+)\s*(?:\.|$)""")


def _unquote(part: str) -> str:
    return part[1:-1] if len(part) >= 2 and part[0] == part[-1] and part[0] in "\"'" else part


def _key_path(text: str) -> tuple[str, ...]:
    return tuple(_unquote(match.group(1)) for match in _KEY_PART.finditer(text))


@dataclass(frozen=True, slots=True)
class _Header:
    line: int
    path: tuple[str, ...]
    is_array: bool


def _split_line(line: str, open_string: str | None) -> tuple[str, str | None]:
    """The characters of ``line`` outside strings and comments (a string leaves its quote), and the
    multi-line string (its delimiter) still open at the end of ``line``, given the one open at its
    start: strings on one line, escapes in basic strings and comments are read as TOML reads them,
    so a \"\"\" inside a comment or a one-line string opens nothing."""
    code: list[str] = []
    at = 0
    while at < len(line):
        if open_string is not None:  # inside a multi-line string: find its end
            end = line.find(open_string, at)
            if open_string == '"""':
                while end > 0 and _escaped(line, end):
                    end = line.find('"""', end + 1)
            if end < 0:
                return "".join(code), open_string
            quote, at, open_string = open_string[0], end + 3, None
            for _ in range(2):  # up to two more quotes: the string's last characters, then its end
                if at < len(line) and line[at] == quote:
                    at += 1
            code.append(quote)
            continue
        char = line[at]
        if char == "#":
            break
        if line.startswith(('"""', "'''"), at):
            open_string, at = line[at : at + 3], at + 3
            continue
        if char in "\"'":
            end = at + 1
            while end < len(line) and line[end] != char:
                end += 2 if char == '"' and line[end] == "\\" else 1
            at = end + 1
            code.append(char)
            continue
        code.append(char)
        at += 1
    return "".join(code), open_string


def _code_lines(text: str) -> Iterator[tuple[int, str]]:
    """Each line's number and its characters outside strings and comments."""
    open_string: str | None = None
    for number, line in enumerate(_lines(text), start=1):
        code, open_string = _split_line(line, open_string)
        yield number, code


def _deepest_line(text: str) -> int:
    """The first line where arrays and inline tables nest deepest."""
    depth = deepest = 0
    found = 1
    for number, code in _code_lines(text):
        for char in code:
            if char in "[{":
                depth += 1
                if depth > deepest:
                    deepest, found = depth, number
            elif char in "]}":
                depth = max(depth - 1, 0)
    return found


def _longest_number_line(text: str) -> int | None:
    """The first line holding a number of more digits than Python converts (4300 by default)."""
    limit = sys.get_int_max_str_digits() or 4300
    digits = re.compile(f"[0-9][0-9A-Za-z_]{{{limit},}}")  # 0x, 0o and 0b numbers too
    return next((number for number, code in _code_lines(text) if digits.search(code)), None)


def _escaped(line: str, at: int) -> bool:
    """Whether the character at ``at`` is escaped by an odd run of backslashes before it."""
    run = 0
    while at - run - 1 >= 0 and line[at - run - 1] == "\\":
        run += 1
    return run % 2 == 1


class _Layout:
    """Line numbers of the table headers and key assignments of a TOML text (a scan, not a parse)."""

    def __init__(self, text: str) -> None:
        self.headers: list[_Header] = []
        # (line, index into headers of the table it sits in or -1 for the top level, first key segment)
        self.assignments: list[tuple[int, int, str]] = []
        in_string: str | None = None
        for number, line in enumerate(_lines(text), start=1):
            if in_string is not None:
                in_string = _split_line(line, in_string)[1]
                continue
            array = _ARRAY_HEADER.match(line)
            table = None if array else _TABLE_HEADER.match(line)
            if array or table:
                found = cast(re.Match[str], array or table)
                self.headers.append(_Header(number, _key_path(found.group("path")), array is not None))
                continue
            assignment = _ASSIGNMENT.match(line)
            if assignment is not None:
                self.assignments.append((number, len(self.headers) - 1, _unquote(assignment.group("key"))))
            in_string = _split_line(line, None)[1]

    def _top_level_assignment(self, key: str) -> int | None:
        return next((line for line, table, name in self.assignments if table == -1 and name == key), None)

    def _table_index(self, table: str, index: int | None) -> int | None:
        """Index in ``headers`` of ``[table]`` (index None) or of the index-th ``[[table]]``."""
        count = 0
        for position, header in enumerate(self.headers):
            if header.path != (table,) or header.is_array != (index is not None):
                continue
            if index is None or count == index:
                return position
            count += 1
        return None

    def table_line(self, table: str, index: int | None) -> int | None:
        position = self._table_index(table, index)
        if position is not None:
            return self.headers[position].line
        # Written inline (``safety = {...}`` or ``rule = [{...}]``): the assignment is the best we have.
        return self._top_level_assignment(table)

    def field_line(self, table: str, index: int | None, field: str) -> int | None:
        position = self._table_index(table, index)
        if position is None:
            return self._top_level_assignment(table)
        for line, in_table, name in self.assignments:
            if in_table == position and name == field:
                return line
        # ``[safety.field]`` or ``[rule.field]`` right after the table declares the field as a sub-table.
        for header in self.headers[position + 1 :]:
            if header.path[:1] != (table,) or header.is_array:
                break
            if header.path[1:2] == (field,):
                return header.line
        return self.headers[position].line

    def top_level_line(self, key: str) -> int | None:
        for header in self.headers:
            if header.path[:1] == (key,):
                return header.line
        return self._top_level_assignment(key)


# --- checking values ----------------------------------------------------------------------------


def _quoted(values: tuple[str, ...]) -> str:
    return ", ".join(f'"{value}"' for value in values)


def _unknown_key_message(key: str, known: tuple[str, ...], where: str) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f'; did you mean "{close[0]}"?' if close else f"; expected one of {_quoted(known)}"
    return f'unknown key "{key}" in {where}{hint}'


def _toml_repr(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    try:
        return repr(value)
    except ValueError:  # a whole number (0xfff...) of more decimal digits than Python writes out
        return "too long to show"


def _type_name(value: object) -> str:
    names = {bool: "a boolean", int: "a whole number", float: "a number", str: "a string", list: "a list"}
    return names.get(type(value), "a table" if isinstance(value, dict) else type(value).__name__)


class _Table:
    """One table being read (``[safety]`` or one ``[[rule]]``): raises errors that point into it."""

    def __init__(self, reader: _Reader, table: str, index: int | None, label: str) -> None:
        self.reader = reader
        self.table = table
        self.index = index
        self.label = label

    def fail(self, field: str | None, message: str) -> NoReturn:
        raise self.located(field, message)

    def warn(self, field: str, message: str) -> None:
        """Note a setting that is valid but does nothing as written (``RuleSet.warnings``)."""
        self.reader.warnings.append(self.located(field, message))

    def located(self, field: str | None, message: str) -> RulesError:
        layout = self.reader.layout
        if field is None:
            line = layout.table_line(self.table, self.index)
        else:
            line = layout.field_line(self.table, self.index, field)
        return RulesError(self.reader.source, line, field, message)

    def wrong_type(self, field: str, value: object, expected: str) -> NoReturn:
        self.fail(field, f"expected {expected}, got {_type_name(value)} ({_toml_repr(value)}) in {self.label}")

    def boolean(self, field: str, value: object) -> bool:
        if not isinstance(value, bool):
            self.wrong_type(field, value, "true or false")
        return value

    def string(self, field: str, value: object) -> str:
        if not isinstance(value, str):
            self.wrong_type(field, value, "a string")
        if not value.strip():
            self.fail(field, f"must not be empty in {self.label}")
        return value

    def number(self, field: str, value: object) -> float:
        # bool is an int in Python; ``true`` where a number belongs is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.wrong_type(field, value, "a number")
        try:
            number = float(value)
        except OverflowError:  # an integer of hundreds of digits
            self.fail(field, f"is too large a number in {self.label}")
        if not math.isfinite(number):
            self.fail(field, f"must be a finite number, got {value!r} in {self.label}")
        return number

    def variable_name(self, field: str, value: object, holds: str) -> str:
        """The name of an environment variable, never its value: what it holds is a secret, and a
        value written here would end up in logs and messages as if it were a name. Whatever is
        written here is never echoed in an error either: it may be the secret itself."""
        if not isinstance(value, str):
            self.fail(
                field,
                f"expected the name of the environment variable that holds {holds} (a string), got "
                f"{_type_name(value)} in {self.label}",
            )
        name = self.string(field, value)
        if not _VARIABLE_NAME.fullmatch(name):
            self.fail(
                field,
                f"names the environment variable that holds {holds} (letters, digits and _, "
                f"e.g. KEYHYGIENE_OPS_WEBHOOK), not the value itself, in {self.label}",
            )
        return name

    def whole_number(self, field: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.wrong_type(field, value, "a whole number")
        return value

    def duration(self, field: str, value: object) -> timedelta:
        if not isinstance(value, str):
            self.wrong_type(field, value, 'a duration string like "7d"')
        try:
            return parse_duration(value)
        except TimeFormatError as exc:
            self.fail(field, f"{exc} (in {self.label})")

    def string_list(self, field: str, value: object) -> tuple[str, ...]:
        if not isinstance(value, list):
            self.wrong_type(field, value, "a list of strings")
        items: list[str] = []
        for position, item in enumerate(value, start=1):
            if not isinstance(item, str):
                self.fail(field, f"entry {position} is {_type_name(item)} ({_toml_repr(item)}), expected a string")
            if not item.strip():
                self.fail(field, f"entry {position} is empty in {self.label}")
            items.append(item)
        return tuple(items)

    def filter_list(self, field: str, value: object) -> tuple[str, ...]:
        """A rule filter's list: never empty, since an empty filter would read as "no filter" (every key)."""
        items = self.string_list(field, value)
        if not items:
            self.fail(field, f"must not be an empty list in {self.label}; leave {field} out to not filter by it")
        return items

    def choice(self, field: str, value: object, choices: tuple[str, ...]) -> str:
        if not isinstance(value, str):
            self.wrong_type(field, value, f"one of {_quoted(choices)}")
        if value not in choices:
            self.fail(field, f'unknown {field} "{value}" in {self.label}; expected one of {_quoted(choices)}')
        return value


def _refuse_padded_globs(table: _Table, field: str, globs: tuple[str, ...], does: str) -> None:
    """Refuse a name glob with white space at either end: it matches only names with that space, so
    a stray space leaves the keys it was written for unprotected (or not excluded)."""
    for position, glob in enumerate(globs, start=1):
        if glob != glob.strip():
            table.fail(
                field,
                f"entry {position} ({_toml_repr(glob)}) has white space around it, so it {does} only names "
                "with that white space: globs match whole names exactly (write * for any characters)",
            )
        if (found := INVISIBLE.search(glob)) is not None:
            table.fail(
                field,
                f"entry {position} ({_toml_repr(glob)}) holds an invisible character ({_character(found.group())}), "
                f"so it {does} only names that hold it too: delete it (a copy and paste brings them in unseen)",
            )


def _character(char: str) -> str:
    return f"U+{ord(char):04X} {unicodedata.name(char, 'unnamed')}"


def _check_protected_hash(table: _Table, position: int, key_hash: str) -> None:
    """Refuse a protect_hashes entry that can never match; warn about one not shaped like a key hash.

    Hashes are compared whole and exactly, while plan's table and Slack notices show them cut
    short: a pasted prefix protects nothing. The API does not promise the shape of a hash, so
    another shape is only warned about."""
    exactly = "protect_hashes compares whole key hashes exactly (`plan --format json` shows them whole)"
    if key_hash != key_hash.strip():
        table.fail("protect_hashes", f"entry {position} has white space around it, so it protects nothing: {exactly}")
    if (found := INVISIBLE.search(key_hash)) is not None:
        table.fail(
            "protect_hashes",
            f"entry {position} holds an invisible character ({_character(found.group())}), so it protects "
            f"nothing: {exactly}",
        )
    if not _KEY_HASH.fullmatch(key_hash):
        table.warn(
            "protect_hashes",
            f"entry {position} ({_toml_repr(key_hash)}) is not 64 lowercase hex characters like a key hash: "
            f"it protects only a key whose hash is exactly this; {exactly}",
        )


class _Reader:
    def __init__(self, source: str, layout: _Layout) -> None:
        self.source = source
        self.layout = layout
        self.warnings: list[RulesError] = []

    def fail_top_level(self, key: str, message: str) -> NoReturn:
        raise RulesError(self.source, self.layout.top_level_line(key), key, message)

    def ruleset(self, data: Mapping[str, Any]) -> RuleSet:
        for key in data:
            if key not in _TOP_LEVEL:
                self.fail_top_level(key, _unknown_key_message(key, _TOP_LEVEL, "the rules file"))
        safety_data = data.get("safety", {})
        if not isinstance(safety_data, dict):
            self.fail_top_level("safety", f"expected a [safety] table, got {_type_name(safety_data)}")
        safety = self.safety(safety_data)
        rules_data = data.get("rule", [])
        if isinstance(rules_data, dict):
            self.fail_top_level("rule", "write each rule as [[rule]] (double brackets), not [rule]")
        if not isinstance(rules_data, list) or not all(isinstance(item, dict) for item in rules_data):
            self.fail_top_level("rule", "expected [[rule]] tables")
        rules: list[Rule] = []
        seen: dict[str, int] = {}
        for index, item in enumerate(rules_data):
            rule = self.rule(index, item)
            if rule.name in seen:
                _Table(self, "rule", index, f"rule #{index + 1}").fail(
                    "name", f'duplicate rule name "{rule.name}": rule #{seen[rule.name] + 1} has it too'
                )
            seen[rule.name] = index
            rules.append(rule)
        notify_data = data.get("notify", [])
        if not isinstance(notify_data, list) or not all(isinstance(item, dict) for item in notify_data):
            self.fail_top_level("notify", "write each notify target as [[notify]] (double brackets)")
        targets: list[NotifyTarget] = []
        for index, item in enumerate(notify_data):
            target = self.notify(index, item)
            if any(other.name == target.name for other in targets):
                _Table(self, "notify", index, f"notify #{index + 1}").fail(
                    "name", f'duplicate notify name "{target.name}"'
                )
            targets.append(target)
        return RuleSet(
            safety=safety, rules=tuple(rules), source=self.source, notify=tuple(targets), warnings=tuple(self.warnings)
        )

    def notify(self, index: int, data: Mapping[str, Any]) -> NotifyTarget:
        table = _Table(self, "notify", index, f"notify #{index + 1}")
        for key in data:
            if key not in NOTIFY_KEYS:
                table.fail(key, _unknown_key_message(key, NOTIFY_KEYS, f"notify #{index + 1}"))
        for required in ("name", "url_env"):
            if required not in data:
                table.fail(required, f"notify #{index + 1} has no {required}")
        values: dict[str, Any] = {
            "name": table.string("name", data["name"]),
            "url_env": table.variable_name("url_env", data["url_env"], "the webhook's URL"),
        }
        if len(values["name"]) > MAX_NOTIFY_NAME:  # the notices table's column
            table.fail("name", f"is longer than {MAX_NOTIFY_NAME} characters in notify #{index + 1}")
        if "format" in data:
            values["format"] = table.choice("format", data["format"], NOTIFY_FORMATS)
        if "secret_env" in data:
            secret_env = table.variable_name("secret_env", data["secret_env"], "the signing secret")
            if values.get("format", "json") == "json":
                values["secret_env"] = secret_env
            else:  # json only: a Slack incoming webhook checks no signature, and needs no secret set
                table.warn(
                    "secret_env", f"has no effect: only json targets are signed, and this one is {values['format']}"
                )
        if "on" in data:
            events = table.string_list("on", data["on"])
            if not events:
                table.fail("on", "must name at least one event")
            for event in events:
                if event not in NOTIFY_EVENTS:
                    table.fail("on", f'unknown event "{event}"; expected some of {_quoted(NOTIFY_EVENTS)}')
            values["on"] = frozenset(events)
        if "upcoming_within" in data:
            within = table.duration("upcoming_within", data["upcoming_within"])
            if within <= timedelta(0):
                table.fail("upcoming_within", "must be more than zero")
            values["upcoming_within"] = within
        if "upcoming" in values.get("on", ()) and "upcoming_within" not in values:
            table.fail("upcoming_within", 'on = [..., "upcoming"] needs upcoming_within, e.g. "7d"')
        if "upcoming_within" in values and "upcoming" not in values.get("on", ()):
            # Allowed (the default on has no "upcoming" either): a file may keep the window while
            # the event is switched off for a while.
            table.warn(
                "upcoming_within", 'has no effect: on does not include "upcoming", so no upcoming notices are sent'
            )
        return NotifyTarget(**values)

    def safety(self, data: Mapping[str, Any]) -> Safety:
        table = _Table(self, "safety", None, "[safety]")
        for key in data:
            if key not in SAFETY_KEYS:
                table.fail(key, _unknown_key_message(key, SAFETY_KEYS, "[safety]"))
        values: dict[str, Any] = {}
        if "dry_run" in data:
            values["dry_run"] = table.boolean("dry_run", data["dry_run"])
        if "max_actions_per_run" in data:
            cap = table.whole_number("max_actions_per_run", data["max_actions_per_run"])
            if cap <= 0:
                table.fail("max_actions_per_run", f"must be at least 1, got {cap}")
            values["max_actions_per_run"] = cap
        if "max_action_percent" in data:
            percent = table.number("max_action_percent", data["max_action_percent"])
            if not 0 < percent <= 100:
                table.fail("max_action_percent", f"must be more than 0 and at most 100, got {percent:g}")
            values["max_action_percent"] = percent
        for field in ("protect_hashes", "protect_names"):
            if field in data:
                values[field] = table.string_list(field, data[field])
        for position, key_hash in enumerate(values.get("protect_hashes", ()), start=1):
            _check_protected_hash(table, position, key_hash)
        _refuse_padded_globs(table, "protect_names", values.get("protect_names", ()), "protects")
        return Safety(**values)

    def rule(self, index: int, data: Mapping[str, Any]) -> Rule:
        table = _Table(self, "rule", index, f"rule #{index + 1}")
        for key in data:
            if key not in RULE_KEYS:
                table.fail(key, _unknown_key_message(key, RULE_KEYS, f"rule #{index + 1}"))
        for required in ("name", "match", "action"):
            if required not in data:
                table.fail(required, f"rule #{index + 1} has no {required}")
        name = table.string("name", data["name"])
        table.label = f'rule "{name}"'
        match = table.choice("match", data["match"], MATCHES)
        action = table.choice("action", data["action"], ACTIONS)

        # Which options belong to which match and action: anything else is a mistake, not ignored,
        # because an ignored option is a rule that does something other than what its author read.
        belongs: dict[str, tuple[bool, str]] = {
            "grace": (action == "delete", 'only applies to action = "delete"'),
            "idle_for": (match == "unused", 'only applies to match = "unused"'),
            "window": (match == "over_budget", 'only applies to match = "over_budget"'),
            "threshold_usd": (match == "over_budget", 'only applies to match = "over_budget"'),
            "reenable": (
                match == "over_budget" and action == "disable",
                'only applies to match = "over_budget" with action = "disable"',
            ),
        }
        for key in data:
            if key in belongs and not belongs[key][0]:
                table.fail(key, f'{belongs[key][1]}; {table.label} has match = "{match}", action = "{action}"')

        readers: dict[str, Callable[[str, object], object]] = {
            "grace": table.duration,
            "idle_for": table.duration,
            "window": lambda field, value: table.choice(field, value, WINDOWS),
            "threshold_usd": table.number,
            "reenable": table.boolean,
            "names": table.filter_list,
            "exclude_names": table.filter_list,
            "workspaces": table.filter_list,
            "min_age": table.duration,
            "disabled": table.boolean,
        }
        values: dict[str, Any] = {key: readers[key](key, value) for key, value in data.items() if key in readers}
        _refuse_padded_globs(table, "exclude_names", values.get("exclude_names", ()), "excludes")

        if match == "unused" and "idle_for" not in values:
            table.fail("idle_for", f'{table.label}: match = "unused" needs idle_for, e.g. idle_for = "30d"')
        if match == "over_budget" and "window" not in values:
            table.fail("window", f'{table.label}: match = "over_budget" needs window = "daily|weekly|monthly|total"')
        if "idle_for" in values and values["idle_for"] <= timedelta(0):
            table.fail("idle_for", f"must be more than zero in {table.label}")
        if "threshold_usd" in values and values["threshold_usd"] <= 0:
            # 0 or less would make every key "over budget".
            table.fail("threshold_usd", f"must be more than zero in {table.label}")
        if "threshold_usd" in values and values["threshold_usd"] > MAX_THRESHOLD_USD:
            table.fail("threshold_usd", f"must be at most {MAX_THRESHOLD_USD:,} US dollars in {table.label}")
        if action == "delete" and values.get("disabled") is False and values.get("grace", DEFAULT_GRACE):
            table.fail(
                "disabled",
                f"{table.label}: disabled = false cannot go with a delete after a grace: the rule disables a "
                'key first, and would then never delete it (leave disabled out, or grace = "0d" to delete '
                "enabled keys at once)",
            )
        if action == "disable" and values.get("disabled") is True:
            table.fail("disabled", f'{table.label}: disabled = true with action = "disable" can never act')
        values.setdefault("grace", DEFAULT_GRACE)
        try:
            return Rule(name=name, match=cast(Any, match), action=cast(Any, action), **values)
        except ValueError as exc:  # the checks above should have caught it; still say where
            table.fail(None, str(exc))
