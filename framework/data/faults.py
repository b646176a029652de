"""One fault policy (``data.on_error``) for everything that reads shards.

Planning (counting samples, checking that shards exist), training and validation streams,
``data inspect --verify`` and the commands that peek into shards all report a bad shard or
sample here: under ``raise`` it stops with one line naming it (a ``DataError``: the CLI
prints it without a traceback); under ``skip`` it is logged once per process with its
reason, and the caller counts it.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

from framework.errors import DataError

ON_ERROR = ("skip", "raise")
log = logging.getLogger("framework.data")
_announced: set[str] = set()
_MAX_REMEMBERED = 100_000  # a bound on memory, not a behaviour: past it, repeats may be logged again
_silenced = False


def report_fault(where: str, reason: str, on_error: str, announce: bool = True) -> None:
    """``where`` names the shard (and sample); ``reason`` says what is wrong with it."""
    if on_error == "raise":
        raise DataError(f"{where}: {reason}")
    if not announce or _silenced or where in _announced:
        return
    if len(_announced) >= _MAX_REMEMBERED:
        _announced.clear()
    _announced.add(where)
    log.warning("skipping %s: %s", where, reason)


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """No warnings inside (``raise`` still raises): for a caller that lists the faults itself."""
    global _silenced
    previous, _silenced = _silenced, True
    try:
        yield
    finally:
        _silenced = previous
