"""The one way a ``bnao`` command reports an error on stderr."""

from __future__ import annotations

import sys
import unicodedata

__all__ = ["error_text", "report_error", "visible"]


def visible(text: str, keep: str = "\n\t") -> str:
    """``text`` with control and format characters other than those in ``keep`` written as escapes (``\\r``,
    ``\\x1b``): a path or value from the user cannot break the report's lines or hide part of it."""
    return "".join(c.encode("unicode_escape").decode("ascii") if c not in keep and
                   unicodedata.category(c).startswith("C") else c for c in text)


def error_text(command: str, message: object) -> str:
    """``bnao COMMAND: error: MESSAGE``; further lines of the message are indented under the first."""
    first, *rest = visible(str(message)).split("\n")
    return "".join([f"bnao {command}: error: {first}", *(f"\n  {line}" for line in rest)])


def report_error(command: str, message: object, code: int = 2) -> int:
    """Prints :func:`error_text` to stderr and returns ``code`` (2: bad input; 1: the work itself failed)."""
    print(error_text(command, message), file=sys.stderr)
    return code
