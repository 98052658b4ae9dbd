"""Helpers of the ``op-celery`` command's tests: run it in-process with click's runner."""

from __future__ import annotations

from typing import cast

from click.testing import CliRunner, Result

from op_celery.cli import main
from op_celery.cli._main import WHERE_PREFIX
from op_celery.dead_letters import DeadLetter

from .._support import dead_letter


def run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def one_line_error(result: Result) -> str:
    """The error of a failed command: exit 1, one ``Error:`` line (last, after at most a
    progress bar's label and the line naming what the command looks at), no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [
        line for line in result.output.splitlines()
        if line.strip() and not line.startswith(WHERE_PREFIX)
    ]  # fmt: skip
    assert [line for line in lines if line.startswith("Error: ")] == lines[-1:], result.output
    assert len(lines) <= 2, result.output
    return lines[-1]


def letter(**overrides: object) -> DeadLetter:
    return cast(DeadLetter, dead_letter(**overrides))
