"""Log lines that a peer cannot forge: control characters escaped in every message.

Peers put text into log messages, the node's and its libraries' alike: a calling AE title, an
Affected SOP Instance UID that pynetdicom quotes when it fails validation. A newline there
forges a log line, a NUL makes the log binary, an ANSI escape rewrites the terminal.
:class:`EscapeControlCharacters`, installed on the log handlers (:func:`install`), rewrites
each record's final message with C0 controls, DEL, C1 controls and the Unicode line and
paragraph separators escaped (``\\n``, ``\\x1b``, ``\\u2028``), whichever logger it came from.
A traceback attached to a record keeps its own lines (frames, source lines, chained
exceptions), each exception's message escaped onto one line: pynetdicom's tracebacks quote
the offending value.
"""

from __future__ import annotations

import logging
import traceback
from types import TracebackType

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_CONTROLS = [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)]
_TABLE: dict[int, str] = {
    **{cp: _NAMED.get(chr(cp), f"\\x{cp:02x}") for cp in _CONTROLS},
    0x2028: "\\u2028",
    0x2029: "\\u2029",
}


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape sequence."""
    return text.translate(_TABLE)


_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def _traceback_lines(te: traceback.TracebackException) -> list[str]:
    """What ``te.format()`` gives, with each exception's own text escaped to one line."""
    lines: list[str] = []
    if te.__cause__ is not None:
        lines += _traceback_lines(te.__cause__)
        lines.append("\nThe above exception was the direct cause of the following exception:\n\n")
    elif te.__context__ is not None and not te.__suppress_context__:
        lines += _traceback_lines(te.__context__)
        lines.append("\nDuring handling of the above exception, another exception occurred:\n\n")
    if te.stack:
        lines.append("Traceback (most recent call last):\n")
        lines += te.stack.format()
    lines.append(escape_controls("".join(te.format_exception_only()).rstrip("\n")) + "\n")
    return lines


def format_exception(exc_info: _ExcInfo) -> str:
    """A record's traceback as ``logging.Formatter.formatException`` writes it, escaped."""
    te = traceback.TracebackException(*exc_info)
    return "".join(_traceback_lines(te)).rstrip("\n")


class EscapeControlCharacters(logging.Filter):
    """A handler filter: the record's message, arguments merged in, and its traceback, with
    controls escaped (the formatter then uses the escaped traceback text)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is logging's to report
            return True
        escaped = escape_controls(message)
        if escaped != message or record.args:
            record.msg, record.args = escaped, None
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            record.exc_text = format_exception(record.exc_info)
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Add the filter to every handler of ``logger`` (the root logger by default), once."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, EscapeControlCharacters) for f in handler.filters):
            handler.addFilter(EscapeControlCharacters())
