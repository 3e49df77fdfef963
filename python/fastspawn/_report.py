"""The rank report: what a rank writes to its report pipe before it exits, and
how the launcher reads it back. Both sides live here so the format is one place.

A report is ``pickle((kind, a, b))``:

- ``("result", pickled_value_or_None, note_or_None)``: ``fn`` returned. The value
  is pickled separately (protocol 5) so that a value that does not unpickle in
  the launcher still leaves a readable report; ``note`` says why a value that
  could not be pickled is None.
- ``("error", formatted_traceback, pickled_exception_or_None)``: ``fn`` raised.
  The traceback text always travels; the exception only where it pickles.

An empty report (the rank died before writing one) reads as "nothing".
"""
from __future__ import annotations

import os
import pickle
import traceback
from typing import Any

RESULT = "result"
ERROR = "error"


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd`` (a pipe may take it in pieces)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def encode_error(exc: BaseException) -> bytes:
    """The report of a rank whose function raised ``exc`` (call it in the
    ``except`` block: the traceback is the one being handled)."""
    tb = traceback.format_exc()
    try:
        exc_bytes: bytes | None = pickle.dumps(exc)
    except Exception:  # noqa: BLE001 - one that does not pickle still has its traceback
        exc_bytes = None
    return pickle.dumps((ERROR, tb, exc_bytes))


def encode_result(value: Any) -> bytes:
    """The report of a rank whose function returned ``value``."""
    if value is None:
        return pickle.dumps((RESULT, None, None))
    try:
        return pickle.dumps((RESULT, pickle.dumps(value, protocol=5), None))
    except Exception as exc:  # noqa: BLE001 - whatever stops it, the rank still reports
        note = f"the return value of type {type(value).__name__} could not be pickled: {exc}"
        return pickle.dumps((RESULT, None, note))


def decode_error(report: bytes) -> tuple[str | None, BaseException | None]:
    """``(traceback text, exception)`` from an error report; ``(None, None)`` for
    anything else (no report, a result, bytes that do not unpickle)."""
    if not report:
        return None, None
    try:
        kind, tb, exc_bytes = pickle.loads(report)
    except Exception:  # noqa: BLE001 - a report cut short (the rank died writing it)
        return None, None
    if kind != ERROR:
        return None, None
    exception = None
    if exc_bytes is not None:
        try:
            exception = pickle.loads(exc_bytes)
        except Exception:  # noqa: BLE001 - its class may not import here: the text stays
            exception = None
    return tb, exception


def decode_result(report: bytes) -> tuple[Any, str | None]:
    """``(value, note)`` from a result report: ``note`` says why ``value`` is None
    when it could not travel; ``(None, None)`` for no report or an error report."""
    if not report:
        return None, None
    kind, value_bytes, note = pickle.loads(report)
    if kind != RESULT:
        return None, None
    if value_bytes is None:
        return None, note
    try:
        return pickle.loads(value_bytes), None
    except Exception as exc:  # noqa: BLE001 - reported as a warning, the result is None
        return None, f"its return value could not be unpickled here: {exc}"
