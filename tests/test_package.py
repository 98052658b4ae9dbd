"""The public surface: what ``__all__`` promises, and what a type checker sees."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import op_celery


def test_all_is_exactly_what_the_package_exports() -> None:
    public = {name for name in vars(op_celery) if not name.startswith("_")}
    modules = {"worker", "testing", "dead_letters", "signals", "contrib", "cli", "metrics"}
    assert set(op_celery.__all__) - {"__version__"} == public - modules
    for name in op_celery.__all__:
        assert hasattr(op_celery, name)


def test_the_package_ships_py_typed() -> None:
    assert (Path(op_celery.__file__).parent / "py.typed").exists()


def test_every_error_derives_from_one_base_and_transient_is_not_permanent() -> None:
    for name in op_celery.__all__:
        obj = getattr(op_celery, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, op_celery.OpenPanelError)
    assert not issubclass(op_celery.TransientError, op_celery.PermanentError)
    assert not issubclass(op_celery.PermanentError, op_celery.TransientError)


def test_mypy_flags_wrong_task_arguments_in_user_code(tmp_path: Path) -> None:
    user = tmp_path / "user_code.py"
    user.write_text(
        textwrap.dedent(
            """
            from op_celery import increment, track
            track.delay(nme="x")
            increment.delay(profile_id="u1", property="v", value="2")
            track.delay("fine", properties={"a": 1}, profile_id="u1")
            """
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(user)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = result.stdout
    assert 'Unexpected keyword argument "nme"' in out
    assert 'Argument "value" to "delay"' in out
    errors = [line for line in out.splitlines() if "user_code.py" in line and "error:" in line]
    assert len(errors) == 2, out
