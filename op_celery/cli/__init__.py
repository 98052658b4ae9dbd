"""The ``op-celery`` command: status, one event from the shell, dead letters, the spool, the
demo and the stand-in server; one module per command group, registered on :func:`main`.

Settings come from the environment, as for the workers (``load_settings()``). A user error (a
bad setting, an invalid event, Redis or the broker down) prints one line, ``Error: ...``, and
exits 1; only a bug shows a traceback. Commands that change things (replay, purge) ask first
unless given ``--yes``; commands meant for scripts take ``--json``.
"""

from __future__ import annotations

from . import _dead_letters, _demo, _send, _spool, _stand_in, _status
from ._main import main

__all__ = ["main"]

_COMMANDS = (_status, _send, _dead_letters, _spool, _demo, _stand_in)  # registered on import
