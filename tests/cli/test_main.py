"""The ``op-celery`` group: help, the user's app (``-A``) and errors every command shares."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from op_celery.testing import StandInServer

from ._support import one_line_error, run


def test_every_command_has_help() -> None:
    commands = [
        [], ["status"], ["send"], ["dead-letters"], ["dead-letters", "list"],
        ["dead-letters", "replay"], ["dead-letters", "purge"], ["spool"], ["spool", "flush"],
        ["demo"], ["stand-in"],
    ]  # fmt: skip
    for command in commands:
        result = run(*command, "--help")
        assert result.exit_code == 0, (command, result.output)
        assert "Usage:" in result.output


# -- the user's app ----------------------------------------------------------------------------


@pytest.fixture
def user_project(
    cli_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """A user's project in the current directory: ``<name>/celery.py`` holds a Celery app whose
    broker (the shared Redis, a private key prefix given only in the app's config) is set
    nowhere in the environment. Yields the package's name."""
    name = f"userproj_{uuid.uuid4().hex[:8]}"
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    broker, prefix = cli_env["OP_CELERY_BROKER_URL"], cli_env["OP_CELERY_BROKER_KEY_PREFIX"]
    (package / "celery.py").write_text(
        "from celery import Celery\n"
        f"app = Celery({name!r}, broker={broker!r}, set_as_current=False)\n"
        f"app.conf.broker_transport_options = {{'global_keyprefix': {prefix!r}}}\n"
        f"app.conf.op_celery_queue = {cli_env['OP_CELERY_QUEUE']!r}\n"
    )
    monkeypatch.delenv("OP_CELERY_BROKER_URL")
    monkeypatch.delenv("OP_CELERY_BROKER_KEY_PREFIX")
    monkeypatch.chdir(tmp_path)
    yield name
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        app = getattr(sys.modules.pop(module), "app", None)
        if app is not None:
            app.close()


def test_dash_a_reads_the_users_app_as_celery_does_and_says_so(
    user_project: str, cli_env: dict[str, str], redis_client: redis.Redis, queue_key: str
) -> None:
    redis_client.rpush(queue_key, b"one", b"two")

    result = run("-A", f"{user_project}.celery", "status", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["broker"]["url"] == (
        f"{cli_env['OP_CELERY_BROKER_URL']} (app {user_project}.celery)"
    )
    assert report["broker"]["queue_length"] == 2
    assert report["redis"]["url"].startswith(cli_env["OP_CELERY_BROKER_URL"])

    # A package name finds its celery module, as for celery -A; so does OP_CELERY_APP.
    text = run("-A", user_project, "status")
    assert text.exit_code == 0, text.output
    assert f"(app {user_project})" in text.output and ": 2 waiting" in text.output


def test_op_celery_app_names_the_app_and_send_enqueue_publishes_through_it(
    user_project: str,
    redis_client: redis.Redis,
    queue_key: str,
    stand_in: StandInServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OP_CELERY_APP", f"{user_project}.celery:app")
    result = run("send", "track", "--name", "through-the-app", "--enqueue")
    assert result.exit_code == 0, result.output
    assert f"(app {user_project}.celery:app)" in result.output
    assert redis_client.llen(queue_key) == 1 and stand_in.requests == []


def test_an_app_that_cannot_be_loaded_is_one_line_that_says_how_to_name_it(
    cli_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    missing = one_line_error(run("-A", "noproj.celery", "status"))
    assert "-A noproj.celery: cannot load the Celery app (ModuleNotFoundError" in missing
    assert "proj.celery:app" in missing and "directory that holds noproj" in missing

    (tmp_path / "notanapp.py").write_text("app = 42\n")
    wrong = one_line_error(run("-A", "notanapp:app", "status"))
    assert "that is a int, not a Celery app" in wrong


def test_a_broker_url_with_an_unknown_scheme_is_one_line_for_every_command(
    cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OP_CELERY_BROKER_URL", "foo://user:hunter2@host/0")
    for command in (
        ["status"], ["dead-letters", "list"], ["spool", "flush"],
        ["send", "track", "--name", "x", "--enqueue"],
    ):  # fmt: skip
        error = one_line_error(run(*command))
        assert "OP_CELERY_BROKER_URL 'foo://user:***@host/0' names no broker" in error, command
        assert "hunter2" not in error and "amqp://" in error


def test_a_broker_url_that_does_not_parse_is_one_line_that_shows_the_form(
    cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OP_CELERY_BROKER_URL", "redis://127.0.0.1:abc/0")
    port = one_line_error(run("status"))
    assert "is not a URL that parses (Port could not be cast" in port
    assert "redis://127.0.0.1:6379/0" in port

    monkeypatch.setenv("OP_CELERY_BROKER_URL", "redis://127.0.0.1:6379/zero")
    database = one_line_error(run("dead-letters", "list"))
    assert "names database 'zero', not a number" in database


def test_every_command_names_the_broker_and_redis_it_looks_at_without_passwords(
    cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    with_password = redis_url.replace("redis://", "redis://:hunter2@", 1)
    monkeypatch.setenv("OP_CELERY_REDIS_URL", with_password)
    shown = with_password.replace("hunter2", "***")
    broker = cli_env["OP_CELERY_BROKER_URL"]

    status = run("status")
    assert f"broker        {broker} (OP_CELERY_BROKER_URL)" in status.output
    assert f"redis         {shown} (OP_CELERY_REDIS_URL)" in status.output
    for command in (["dead-letters", "list"], ["dead-letters", "purge", "--yes"]):
        result = run(*command)
        assert result.stderr.startswith(f"op-celery: Redis {shown} (OP_CELERY_REDIS_URL)"), command
    replay = run("dead-letters", "replay", "--yes")
    assert f"op-celery: broker {broker} (OP_CELERY_BROKER_URL); Redis {shown}" in replay.stderr
    assert f"op-celery: broker {broker}" in run("spool", "flush").stderr
    assert all("hunter2" not in r.output for r in (status, replay))
