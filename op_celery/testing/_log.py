"""One line per request the stand-in answers, written by a thread of its own.

`RequestLog` takes a line from each connection thread (`note`) and writes it to a text stream
(a terminal, usually) from a writer thread, so a slow or unread stream never holds an answer:
when `LOG_QUEUE_LINES` lines wait already, new ones are dropped and counted, and the next line
written says how many. A line reads::

    12:00:01.234 POST /track 200 client=0b6f5e1c-2d3a-4b5c-8d9e-0f1a2b3c4d5e track "signup"
    12:00:01.301 POST /track 429 client=0b6f5e1c-2d3a-4b5c-8d9e-0f1a2b3c4d5e identify
    12:00:02.010 POST /__stand-in/rate-limit 200

The client id is the ``openpanel-client-id`` header as sent; the secret is never written, nor
any other header or the payload beyond the event's type and name. Text from the request is
shortened and its unprintable characters escaped, so a request cannot write to the terminal.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Final, TextIO

__all__ = ["LOG_QUEUE_LINES", "RequestLog", "format_line"]

#: Most lines waiting for the writer; past this, lines are dropped and counted.
LOG_QUEUE_LINES: Final = 10_000
#: Longest text taken from a request into one field of a line, in characters.
MAX_FIELD_CHARS: Final = 100


def _clean(text: str) -> str:
    """``text`` shortened to `MAX_FIELD_CHARS` with unprintable characters escaped."""
    if len(text) > MAX_FIELD_CHARS:
        text = text[: MAX_FIELD_CHARS - 1] + "…"
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def format_line(
    at: float,
    method: str,
    target: str,
    outcome: int | str,
    client_id: str | None,
    kind: str | None,
    name: object,
) -> str:
    """One request's line: time, method, target, status (or what happened), client, event.

    ``client_id`` None leaves out the client (control endpoints); ``kind`` None leaves out the
    event (not a ``/track`` request); ``name`` is written only when it is a string.
    """
    stamp = time.strftime("%H:%M:%S", time.localtime(at)) + f".{int(at % 1 * 1000):03d}"
    parts = [stamp, _clean(method), _clean(target), str(outcome)]
    if client_id is not None:
        parts.append(f"client={_clean(client_id) or '-'}")
    if kind is not None:
        parts.append(_clean(kind) or "-")
        if isinstance(name, str):
            parts.append(f'"{_clean(name)}"')
    return " ".join(parts)


class RequestLog:
    """Write lines to ``stream`` from a writer thread named ``thread_name``; see the module."""

    def __init__(
        self, stream: TextIO, thread_name: str, *, max_waiting: int = LOG_QUEUE_LINES
    ) -> None:
        self._stream = stream
        self._max_waiting = max_waiting
        self._waiting: deque[str] = deque()
        self._dropped = 0
        self._closing = False
        self._ready = threading.Condition()
        self._thread = threading.Thread(target=self._write_lines, name=thread_name, daemon=True)
        self._thread.start()

    def note(self, line: str) -> None:
        """Queue ``line`` for the writer; never blocks. Dropped when too many lines wait."""
        with self._ready:
            if self._closing:
                return
            if len(self._waiting) >= self._max_waiting:
                self._dropped += 1
                return
            self._waiting.append(line)
            self._ready.notify()

    def close(self, timeout: float) -> None:
        """Write what waits, then end the writer thread; wait at most ``timeout`` seconds.

        A stream that blocks for longer (a pipe nobody reads) keeps the daemon thread until
        the process ends; its remaining lines are lost.
        """
        with self._ready:
            self._closing = True
            self._ready.notify()
        self._thread.join(timeout)

    def _write_lines(self) -> None:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: self._waiting or self._closing)
                lines = list(self._waiting)
                self._waiting.clear()
                dropped, self._dropped = self._dropped, 0
                closing = self._closing
            if dropped:
                lines.append(f"({dropped} request lines dropped: the output was not read)")
            if lines:
                try:
                    self._stream.write("".join(f"{line}\n" for line in lines))
                    self._stream.flush()
                except (OSError, ValueError):
                    return  # the stream is gone (closed pipe, closed file): stop writing
            if closing:
                return
