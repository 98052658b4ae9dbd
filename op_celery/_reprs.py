"""The text copies of a call's arguments (``argsrepr``/``kwargsrepr``), as Celery renders them.

Celery writes a ``saferepr`` of a task's positional and keyword arguments into every protocol-2
message's headers, for monitoring tools to show. Its streaming ``saferepr`` costs about 40 µs
for a ``track``; op-celery's arguments are plain JSON (its validation lets nothing else
through), which `kwargsrepr` renders to the same text in a fraction of that, and hands anything
else to ``saferepr`` itself. Both publish paths use it (``_publish``): the fast path writes the
headers itself, Celery's path is given the text as its ``argsrepr``/``kwargsrepr`` options.
`origin` is the ``origin`` header Celery writes (the same per process), and `argsrepr` the
copy of the (always empty) positional arguments.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from celery.utils.nodenames import anon_nodename
from celery.utils.saferepr import saferepr

__all__ = ["argsrepr", "kwargsrepr", "origin"]

_origins: dict[int, str] = {}
_argsreprs: dict[tuple[int, int], str] = {}


def origin() -> str:
    """The ``origin`` header of a message published by this process."""
    # anon_nodename() is "gen<pid>@<host>" with a memoised host name: the same per process.
    pid = os.getpid()
    text = _origins.get(pid)
    if text is None:
        text = _origins[pid] = anon_nodename()
    return text


def argsrepr(maxsize: int, maxlevels: int) -> str:
    """``saferepr(())``, the text copy of a call without positional arguments."""
    key = (maxsize, maxlevels)
    text = _argsreprs.get(key)
    if text is None:
        text = _argsreprs[key] = saferepr((), maxsize, maxlevels=maxlevels)
    return text


class _NotPlain(Exception):
    """A value the fast renderer leaves to ``saferepr``."""


def kwargsrepr(kwargs: Mapping[str, Any], maxsize: int, maxlevels: int) -> str:
    """``celery.utils.saferepr.saferepr(kwargs, maxsize, maxlevels=maxlevels)``, faster.

    Renders plain JSON values (exact ``dict``, ``list``, ``str``, ``int``, ``float``, ``bool``
    and None) as ``saferepr`` does: strings quoted with ``'`` and only ``'`` escaped, numbers
    with ``str()``, containers nested ``maxlevels`` deep or more as ``{...}``/``[...]``. When the
    text would be longer than ``maxsize`` (then ``saferepr`` truncates it) or a value is of
    another type, it returns ``saferepr``'s own result.
    """
    if isinstance(maxsize, int) and maxsize > 0 and isinstance(maxlevels, int):
        parts: list[str] = []
        try:
            _render(kwargs, parts, 0, maxlevels)
        except _NotPlain:
            pass
        else:
            text = "".join(parts)
            # With room for everything, saferepr truncates nothing: each token starts with
            # more budget left than the rest of the text needs.
            if len(text) <= maxsize:
                return text
    return saferepr(kwargs, maxsize, maxlevels=maxlevels)


def _render(value: Any, out: list[str], level: int, maxlevels: int) -> None:
    # Scalars inside containers are rendered inline: most of a payload is scalars, and a call
    # per value would cost more than the rendering.
    kind = type(value)
    if kind is dict:
        if maxlevels and level >= maxlevels:
            out.append("{...}")
            return
        out.append("{")
        first = True
        for key, item in value.items():
            if type(key) is not str:
                raise _NotPlain
            if first:
                first = False
            else:
                out.append(", ")
            out.append("'" + key.replace("'", "\\'") + "': ")
            kind = type(item)
            if kind is str:
                out.append("'" + item.replace("'", "\\'") + "'")
            elif item is None:
                out.append("None")
            elif kind is int or kind is float or kind is bool:
                out.append(str(item))
            else:
                _render(item, out, level + 1, maxlevels)
        out.append("}")
    elif kind is list:
        if maxlevels and level >= maxlevels:
            out.append("[...]")
            return
        out.append("[")
        first = True
        for item in value:
            if first:
                first = False
            else:
                out.append(", ")
            kind = type(item)
            if kind is str:
                out.append("'" + item.replace("'", "\\'") + "'")
            elif item is None:
                out.append("None")
            elif kind is int or kind is float or kind is bool:
                out.append(str(item))
            else:
                _render(item, out, level + 1, maxlevels)
        out.append("]")
    elif kind is str:
        out.append("'" + value.replace("'", "\\'") + "'")
    elif value is None:
        out.append("None")
    elif kind is int or kind is float or kind is bool:
        out.append(str(value))
    else:
        raise _NotPlain
