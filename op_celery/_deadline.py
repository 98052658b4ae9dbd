"""A total deadline for one HTTP request: connect, send and the whole answer.

requests' (and urllib3's) read timeout bounds each read, not the request: a server that drips
its answer a byte a second holds a worker for as long as it likes. The ledger's claim on an
event runs out after a bounded time (``Settings.claim_ttl_s``), and a request still running
then could be sent a second time by another worker. So every request runs under a deadline a
little shorter than that claim; when it passes, the request's socket is shut down, which ends
whatever read or write is blocked on it at once.

One watchdog thread per process serves every request. Arming and disarming cost a heap push
and a flag (no thread is woken); the watchdog looks at the heap every :data:`TICK_S`, so a
deadline is kept to within that tick. A child process after ``fork()`` starts its own.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import socket
import threading
import time
from typing import Any

__all__ = ["TICK_S", "Deadline", "arm", "current"]

#: How often the watchdog looks for deadlines that passed; how late one may be kept.
TICK_S = 0.25


class Deadline:
    """One armed deadline: :meth:`bind` it to the connection that carries the request."""

    __slots__ = ("_connection", "at", "done", "expired")

    def __init__(self, at: float) -> None:
        #: ``time.monotonic()`` when it passes.
        self.at = at
        self.done = False
        self.expired = False
        self._connection: Any = None

    def bind(self, connection: Any) -> None:
        """The (urllib3/http.client) connection whose ``sock`` the deadline shuts down."""
        self._connection = connection

    def disarm(self) -> None:
        """The request ended (answered or failed): nothing to do when the deadline passes."""
        self.done = True
        _local.deadline = None

    def _expire(self) -> None:
        if self.done:
            return
        self.expired = True
        sock = getattr(self._connection, "sock", None)
        if isinstance(sock, socket.socket):
            # Already closed if the request ended meanwhile.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Watchdog:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Deadline]] = []
        self._lock = threading.Lock()
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float) -> Deadline:
        deadline = Deadline(time.monotonic() + seconds)
        with self._lock:
            heapq.heappush(self._heap, (deadline.at, next(self._order), deadline))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="op-celery-deadlines", daemon=True
                )
                self._thread.start()
        return deadline

    def _run(self) -> None:
        while True:
            time.sleep(TICK_S)
            now = time.monotonic()
            due: list[Deadline] = []
            with self._lock:
                while self._heap and self._heap[0][0] <= now:
                    due.append(heapq.heappop(self._heap)[2])
            for deadline in due:
                deadline._expire()


_watchdog = _Watchdog()
_local = threading.local()


def _after_fork() -> None:
    global _watchdog, _local
    _watchdog = _Watchdog()
    _local = threading.local()


os.register_at_fork(after_in_child=_after_fork)


def arm(seconds: float) -> Deadline:
    """Start this thread's request deadline, ``seconds`` from now; the connection that sends
    the request finds it with :func:`current` and binds it."""
    deadline = _watchdog.arm(seconds)
    _local.deadline = deadline
    return deadline


def current() -> Deadline | None:
    """This thread's armed deadline, if a request is running under one."""
    deadline: Deadline | None = getattr(_local, "deadline", None)
    return deadline
