"""Text shown to a person as it is, but for what could drive a terminal or hide what it says."""

from __future__ import annotations

import re

# C0 controls, DEL, C1 controls (0x9b alone starts a CSI), line and paragraph separators, the
# bidirectional controls that reorder what a reader sees ("Trojan Source"), and lone surrogates
# (valid JSON, which no terminal can be sent as UTF-8).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape_one(found: re.Match[str]) -> str:
    code = ord(found.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape_control(text: str) -> str:
    """``text`` with every control character written as a visible escape (ESC as ``\\x1b``)."""
    return _UNSAFE.sub(_escape_one, text)
