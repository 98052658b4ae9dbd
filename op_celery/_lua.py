"""The package's Lua scripts (``op_celery/lua/*.lua``), each naming its KEYS and ARGV at the top."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

__all__ = ["lua"]


@cache
def lua(name: str) -> str:
    """The text of ``op_celery/lua/<name>``, read once per process."""
    return (files("op_celery") / "lua" / name).read_text(encoding="utf-8")
