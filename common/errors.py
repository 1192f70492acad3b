"""The one base class of *expected* errors: bad input or environment, never a bug.

An expected error's message says what is wrong with which input and how to fix it. The entry points
(``train.py``, ``tools.*``) print it as one ``error:`` line on stderr and exit with status 2, without a
traceback (``BIMORS_DEBUG=1`` shows it). Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

import os

DEBUG_ENV = "BIMORS_DEBUG"


class ExpectedError(Exception):
    """Bad input or environment (a file, a flag, a config value); the message names it and the fix."""


class ConfigError(ExpectedError, ValueError):
    """A config value or command-line option that cannot work (the message names the key and the fix)."""


def debug_enabled() -> bool:
    """True when ``BIMORS_DEBUG`` is set to a true value: expected errors then show their traceback."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` for an ``error:`` line.

    An exception raised in a DataLoader worker comes back with the worker's traceback as its message; its
    last line (``module.Class: message``) is the original message, which is kept without the class name.
    """
    text = str(exc).strip() or type(exc).__name__
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        name, sep, message = last.partition(": ")
        text = message if sep and " " not in name else last
    return text
