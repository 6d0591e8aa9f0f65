"""Progress output that suits where it goes: a tqdm bar on a terminal, plain lines in a log file.

tqdm redraws its bar with carriage returns and ANSI escape codes; in a file (``nohup``, ``ray job
logs``, CI) that is noise. :func:`progress_bar` returns a tqdm bar only when the stream is a
terminal; otherwise a :class:`LineProgress` that writes one plain line at every tenth of the work
(and at the end). :func:`progress_enabled` turns all of it off for a block (``--quiet``), and
:func:`plain_ray_logs` keeps Ray's relayed worker lines free of colour codes in a log file.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

# A process-wide switch, not a context variable: the Tune sweep's searcher runs the telescopic
# search on its own thread, which must stay quiet under --quiet too.
_ENABLED = [True]


@contextlib.contextmanager
def progress_enabled(enabled: bool) -> Iterator[None]:
    """Within the block, :func:`progress_bar` shows nothing (in any thread) when ``enabled`` is False."""
    previous = _ENABLED[0]
    _ENABLED[0] = bool(enabled) and previous
    try:
        yield
    finally:
        _ENABLED[0] = previous


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _PlainText:
    """A text stream that drops ANSI escape codes and passes everything else to the stream it wraps."""

    def __init__(self, wrapped: TextIO):
        self._wrapped = wrapped

    def write(self, text: str) -> int:
        self._wrapped.write(_ANSI_ESCAPE.sub("", text) if "\x1b" in text else text)
        return len(text)

    def __getattr__(self, name: str) -> Any:  # flush, fileno, isatty, encoding, ...
        return getattr(self._wrapped, name)


class StripAnsiFilter(logging.Filter):
    """Removes ANSI escape codes from a record's message (Ray's "View the dashboard at" line
    hard-codes bold green, whatever the stream)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "\x1b" in message:
            record.msg, record.args = _ANSI_ESCAPE.sub("", message), ()
        return True


def plain_ray_logs(stream: TextIO | None = None) -> None:
    """When ``stream`` (stderr) is not a terminal, keep Ray's output there free of colour codes:
    the worker lines Ray relays to the driver (``RAY_COLOR_PREFIX=0``, read as each line is printed;
    an explicit setting wins) and the driver's own ``ray`` log records (:class:`StripAnsiFilter`)."""
    if not is_terminal(stream if stream is not None else sys.stderr):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        if stream is None:
            # Ray colours parts of the worker lines it relays ("[repeated 2x across cluster]")
            # whatever RAY_COLOR_PREFIX says, writing to whatever sys.stdout / sys.stderr are then.
            for name in ("stdout", "stderr"):
                current = getattr(sys, name)
                if not isinstance(current, _PlainText) and not is_terminal(current):
                    setattr(sys, name, _PlainText(current))
        for name in ("ray", "ray._private.worker"):  # a filter applies to its own logger's records only
            logger = logging.getLogger(name)
            if not any(isinstance(f, StripAnsiFilter) for f in logger.filters):
                logger.addFilter(StripAnsiFilter())


def is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
                 enabled: bool = True, stream: TextIO | None = None, leave: bool = False, rate: bool = True):
    """A tqdm bar on a terminal, a :class:`LineProgress` elsewhere, a silent bar when disabled.

    All three support ``update``, ``set_postfix_str``, ``close``, iteration and ``with``.
    """
    from tqdm.auto import tqdm

    stream = stream if stream is not None else sys.stderr
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if not (enabled and _ENABLED[0]):
        return tqdm(iterable, total=total, disable=True)
    if is_terminal(stream):
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, leave=leave)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, stream=stream, rate=rate)


class LineProgress:
    """tqdm's interface, printed as plain lines: ``desc: 300/1000 ex (30%), 12.5 ex/s, 24s``.

    A line is written when the count crosses each tenth of ``total`` (every update when the total
    is unknown or at most 10), with the latest postfix; nothing is redrawn, so a log stays readable.
    """

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
                 unit: str = "it", stream: TextIO | None = None, rate: bool = True):
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.rate = rate
        self.n = 0
        self.postfix = ""
        self.start = time.perf_counter()
        self._printed_tenth = 0
        self._closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.total and self.total > 10:
            tenth = min(10, self.n * 10 // self.total)
            if tenth <= self._printed_tenth:
                return
            self._printed_tenth = tenth
        self._write()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.total and self.total > 10 and self._printed_tenth < 10 and self.n:
            self._write()

    def _write(self) -> None:
        elapsed = time.perf_counter() - self.start
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = f", {self.n / elapsed:.3g} {self.unit}/s" if self.rate and elapsed > 0 else ""
        postfix = f", {self.postfix}" if self.postfix else ""
        self.stream.write(f"{self.desc}: {count} {self.unit}{share}{rate}, {elapsed:.0f}s{postfix}\n")
        self.stream.flush()
