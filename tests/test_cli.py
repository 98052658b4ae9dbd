"""The ``op-celery`` command: in-process with click's runner against the shared Redis (private
prefixes and queue) and the stand-in server; the demo and the stand-in as real subprocesses."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import cast

import pytest
import redis
from celery import _state
from click.testing import CliRunner, Result

from op_celery import OpenPanelClient, _app, build_event
from op_celery._events import normalize_call
from op_celery._outbox import outbox_keys
from op_celery._settings import load_settings
from op_celery._spool import Spool
from op_celery.cli import main
from op_celery.dead_letters import DeadLetter, DeadLetterStore
from op_celery.testing import StandInServer

from ._support import CLIENT_ID, CLIENT_SECRET, dead_letter, free_port

#: Seconds the demo subprocess may take before the test gives up on it.
DEMO_TIMEOUT_S = 100


@pytest.fixture
def cli_env(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[dict[str, str]]:
    """The workers' environment, as the CLI reads it, and a package app built afresh from it."""
    for name in list(os.environ):
        if name.startswith(("OPENPANEL_", "OP_CELERY_", "CELERY_")) or name == "REDIS_URL":
            monkeypatch.delenv(name)
    values = {k: v for k, v in env.items() if k.startswith(("OPENPANEL_", "OP_CELERY_"))}
    values["OP_CELERY_SPOOL_DIR"] = str(tmp_path / "spool")
    values["OP_CELERY_PUBLISH_TIMEOUT"] = "0.3"
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(_app, "_package_app", None)
    monkeypatch.setattr(_state._tls, "current_app", None)
    _app.reset_settings()
    yield values
    if _app._package_app is not None:
        _app._package_app.close()
    _app.reset_settings()


@pytest.fixture
def store(cli_env: dict[str, str]) -> DeadLetterStore:
    return DeadLetterStore(load_settings())


@pytest.fixture
def queue_key(cli_env: dict[str, str]) -> str:
    return cli_env["OP_CELERY_BROKER_KEY_PREFIX"] + cli_env["OP_CELERY_QUEUE"]


def run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def one_line_error(result: Result) -> str:
    """The error of a failed command: exit 1, one ``Error:`` line (last, after at most a
    progress bar's label), no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("Error: ")] == lines[-1:], result.output
    assert len(lines) <= 2, result.output
    return lines[-1]


def letter(**overrides: object) -> DeadLetter:
    return cast(DeadLetter, dead_letter(**overrides))


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


# -- dead letters ----------------------------------------------------------------------------


def test_dead_letters_list_prints_a_table_filters_and_limits(store: DeadLetterStore) -> None:
    first = letter()
    shop = letter(project="shop", error_type="InvalidPayload", status=400, error="HTTP 400 bad")
    store.add(first)
    store.add(shop)

    result = run("dead-letters", "list")
    assert result.exit_code == 0, result.output
    header, *rows = result.output.splitlines()
    assert header.split() == [
        "id", "operation", "project", "error_type", "status", "attempts", "failed_at",
    ]  # fmt: skip
    assert [row.split()[0] for row in rows] == [first.id, shop.id]
    assert rows[1].split()[1:6] == ["track", "shop", "InvalidPayload", "400", "1"]

    assert shop.id not in run("dead-letters", "list", "--project", "default").output
    assert first.id not in run("dead-letters", "list", "--error", "400").output
    assert len(run("dead-letters", "list", "--limit", "1").output.splitlines()) == 2
    assert "No dead letters match." in run("dead-letters", "list", "--project", "x").output


def test_dead_letters_list_json_is_one_array_of_every_field(store: DeadLetterStore) -> None:
    kept = letter(kwargs={"name": "signup", "project": "default"})
    store.add(kept)
    result = run("dead-letters", "list", "--json")
    assert result.exit_code == 0, result.output
    [entry] = json.loads(result.output)
    assert entry["id"] == kept.id and entry["kwargs"]["name"] == "signup"
    assert entry["error_type"] == "AuthenticationError" and entry["replayable"] is True
    assert json.loads(run("dead-letters", "list", "--json", "--project", "x").output) == []


def test_replay_re_enqueues_each_dead_letter_once_even_when_run_twice(
    store: DeadLetterStore, redis_client: redis.Redis, queue_key: str
) -> None:
    for _ in range(3):
        store.add(letter())
    store.add(letter(operation="unknown", replayable=False, error_type="PoisonMessage"))

    result = run("dead-letters", "replay", "--yes")
    assert result.exit_code == 0, result.output
    assert "Re-enqueued 3 dead letters; 1 not replayable" in result.output
    assert redis_client.llen(queue_key) == 3

    again = run("dead-letters", "replay", "--yes")
    assert again.exit_code == 0, again.output
    assert "No replayable dead letters match; 1 not replayable" in again.output
    assert redis_client.llen(queue_key) == 3
    assert len(store) == 1


def test_replay_asks_first_and_does_nothing_on_no(
    store: DeadLetterStore, redis_client: redis.Redis, queue_key: str
) -> None:
    store.add(letter())
    result = run("dead-letters", "replay", input="n\n")
    assert result.exit_code == 1 and "Re-enqueue 1 dead letters?" in result.output
    assert len(store) == 1 and redis_client.llen(queue_key) == 0


def test_purge_asks_first_and_deletes_only_what_matches(store: DeadLetterStore) -> None:
    store.add(letter())
    store.add(letter(error_type="InvalidPayload", status=400, error="HTTP 400 bad"))

    refused = run("dead-letters", "purge", input="n\n")
    assert refused.exit_code == 1 and "Delete 2 dead letters for good?" in refused.output
    assert len(store) == 2

    confirmed = run("dead-letters", "purge", "--error", "InvalidPayload", input="y\n")
    assert confirmed.exit_code == 0 and "Deleted 1 dead letters." in confirmed.output
    assert [x.error_type for x in store.list()] == ["AuthenticationError"]

    assert "Deleted 1 dead letters." in run("dead-letters", "purge", "--yes").output
    assert len(store) == 0
    assert "No dead letters match." in run("dead-letters", "purge", "--yes").output


# -- send ------------------------------------------------------------------------------------


def test_send_track_goes_straight_to_the_api_and_prints_its_answer(
    cli_env: dict[str, str], stand_in: StandInServer
) -> None:
    result = run(
        "send", "track", "--name", "signup", "--profile-id", "user-1",
        "--property", "plan=pro", "--property", "value=12.5", "--property", 'tags=["a","b"]',
        "--property", "note=not json", "--group-id", "acme",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"HTTP 200 from {stand_in.url}/track")
    assert "deviceId" in result.output
    [received] = stand_in.received
    assert received.type == "track" and received.payload["profileId"] == "user-1"
    properties = {k: v for k, v in received.payload["properties"].items() if k != "__timestamp"}
    assert properties == {"plan": "pro", "value": 12.5, "tags": ["a", "b"], "note": "not json"}
    assert received.payload["groups"] == ["acme"]


def test_send_identify_then_increment_of_that_profile(
    cli_env: dict[str, str], stand_in: StandInServer
) -> None:
    identify = run("send", "identify", "--profile-id", "u2", "--email", "ada@example.com")
    assert identify.exit_code == 0, identify.output
    increment = run(
        "send", "increment", "--profile-id", "u2", "--property-name", "visits", "--value", "2"
    )
    assert increment.exit_code == 0, increment.output
    payloads = [r.payload for r in stand_in.received]
    assert payloads[0] == {"profileId": "u2", "email": "ada@example.com"}
    assert payloads[1] == {"profileId": "u2", "property": "visits", "value": 2}


def test_send_an_invalid_event_prints_the_rule_and_sends_nothing(
    cli_env: dict[str, str], stand_in: StandInServer
) -> None:
    error = one_line_error(run("send", "track", "--name", "session_start"))
    assert "track: name" in error and "session_start" in error
    missing = one_line_error(run("send", "identify"))
    assert "identify: profile_id is required (--profile-id)" in missing
    email = one_line_error(run("send", "identify", "--profile-id", "u", "--email", "nope"))
    assert "identify: email" in email

    wrong_option = run("send", "track", "--name", "x", "--email", "a@b.co")
    assert wrong_option.exit_code == 2 and "--email does not apply to track" in wrong_option.output
    assert "Traceback" not in wrong_option.output
    assert stand_in.requests == []


def test_send_refused_by_the_server_prints_status_and_message(
    cli_env: dict[str, str], stand_in: StandInServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENPANEL_CLIENT_SECRET", "wrong-secret")
    error = one_line_error(run("send", "track", "--name", "signup"))
    assert "HTTP 401" in error and "Ingestion:" in error
    assert "wrong-secret" not in error


def test_send_without_credentials_names_the_setting(
    cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENPANEL_CLIENT_ID")
    error = one_line_error(run("send", "track", "--name", "signup"))
    assert "OPENPANEL_CLIENT_ID" in error


def test_send_enqueue_puts_the_event_on_the_queue(
    cli_env: dict[str, str], redis_client: redis.Redis, queue_key: str, stand_in: StandInServer
) -> None:
    result = run("send", "track", "--name", "queued", "--enqueue")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Enqueued track event ")
    assert redis_client.llen(queue_key) == 1
    assert stand_in.requests == []


# -- status ----------------------------------------------------------------------------------


def test_status_shows_queue_dead_letters_spool_and_projects(
    cli_env: dict[str, str],
    store: DeadLetterStore,
    redis_client: redis.Redis,
    queue_key: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENPANEL_RATE_LIMIT", "50/s")
    redis_client.rpush(queue_key, b"one", b"two")
    queue = cli_env["OP_CELERY_QUEUE"]
    records, _ = outbox_keys(queue, queue_key.removesuffix(queue))
    redis_client.hset(records, mapping={"e1": "{}", "e2": "{}", "e3": "{}"})
    store.add(letter())
    store.add(letter(project="shop", error_type="InvalidPayload", status=400))
    Spool(cli_env["OP_CELERY_SPOOL_DIR"]).write("op_celery.track", {"name": "x"}, {})

    result = run("status", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["broker"]["queue"] == cli_env["OP_CELERY_QUEUE"]
    assert report["broker"]["queue_length"] == 2
    assert report["broker"]["unfinished"] == 3
    dead = report["dead_letters"]
    assert dead["total"] == 2 and dead["by_project"] == {"default": 1, "shop": 1}
    assert dead["by_error_type"] == {"AuthenticationError": 1, "InvalidPayload": 1}
    assert report["spool"] == {"dir": cli_env["OP_CELERY_SPOOL_DIR"], "files": 1}
    [project] = report["projects"]
    assert project["name"] == "default" and project["client_id"] == CLIENT_ID
    assert project["rate_limit"] == "50/s"
    if find_spec("op_celery._limiter") is not None:
        limiter = project["limiter"]
        assert limiter["paused_s"] == 0 and limiter["available"] == limiter["burst"] >= 1

    text = run("status")
    assert text.exit_code == 0, text.output
    assert f"{queue}: 2 waiting, 3 not yet finished (outbox)" in text.output
    assert "dead letters  2" in text.output and "1 files in" in text.output
    assert CLIENT_SECRET not in text.output and CLIENT_SECRET not in result.output


def test_status_with_redis_down_or_a_bad_setting_is_one_line(
    cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OP_CELERY_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")
    assert "did not answer" in one_line_error(run("status"))
    assert "did not answer" in one_line_error(run("dead-letters", "list"))

    monkeypatch.setenv("OP_CELERY_VISIBILITY_TIMEOUT", "soon")
    assert "OP_CELERY_VISIBILITY_TIMEOUT" in one_line_error(run("status"))


# -- spool -----------------------------------------------------------------------------------


def test_spool_flush_with_an_empty_spool_says_so(cli_env: dict[str, str]) -> None:
    result = run("spool", "flush")
    assert result.exit_code == 0, result.output
    assert "is empty: nothing to re-publish" in result.output


def test_spool_flush_republishes_a_spooled_event(
    cli_env: dict[str, str], redis_client: redis.Redis, queue_key: str
) -> None:
    spool = Spool(cli_env["OP_CELERY_SPOOL_DIR"])
    message = normalize_call("track", ("spooled",), {})
    spool.write("op_celery.track", message, {"queue": cli_env["OP_CELERY_QUEUE"]})

    result = run("spool", "flush")
    assert result.exit_code == 0, result.output
    assert "Re-published 1 spooled events" in result.output
    assert len(spool) == 0 and redis_client.llen(queue_key) == 1


def test_spool_flush_with_the_broker_down_keeps_the_file_and_says_so(
    cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(cli_env["OP_CELERY_SPOOL_DIR"])
    spool.write("op_celery.track", normalize_call("track", ("kept",), {}), {})
    monkeypatch.setenv("OP_CELERY_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")
    error = one_line_error(run("spool", "flush"))
    assert "still does not answer: 0 of 1" in error
    assert len(spool) == 1


# -- demo and stand-in -----------------------------------------------------------------------


def test_demo_refuses_a_bad_rate_before_starting_anything(cli_env: dict[str, str]) -> None:
    assert "--rate-limit" in one_line_error(run("demo", "--rate-limit", "fast"))


def test_stand_in_serves_until_sigterm(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "op_celery.cli", "stand-in", "--client",
               f"{CLIENT_ID}:{CLIENT_SECRET}"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("OPENPANEL_API_URL=http://127.0.0.1:"), line
        client = OpenPanelClient(CLIENT_ID, CLIENT_SECRET, line.split("=", 1)[1])
        assert client.send(build_event("track", {"name": "hello"})).status == 200
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                found.append(f"{entry.name}: {cmdline}")
    return found


@pytest.mark.timeout(DEMO_TIMEOUT_S + 20)
def test_demo_with_no_setting_delivers_everything_and_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENPANEL_", "OP_CELERY_", "CELERY_")) and k != "REDIS_URL"
    }
    env.update(
        OP_CELERY_EMBEDDED_DB=str(tmp_path / "embedded.db"),
        XDG_CACHE_HOME=str(tmp_path / "cache"),
        TMPDIR=str(tmp_path),
    )
    command = [sys.executable, "-m", "op_celery.cli", "demo", "--events", "60",
               "--timeout", str(DEMO_TIMEOUT_S - 20)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=DEMO_TIMEOUT_S)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Traceback" not in output
    assert re.search(r"delivered\s+59\s+of 59 deliverable", output), output
    assert "All 59 deliverable events were delivered." in output
    assert re.search(r"retried\s+[1-9]", output), output  # the injected faults show

    [workers] = re.findall(r"workers\s+pids ([\d, ]+)", output)
    [embedded] = re.findall(r"embedded Redis, pid (\d+)", output)
    pids = [int(pid) for pid in workers.split(", ")] + [int(embedded)]
    assert len(pids) == 3
    assert not [pid for pid in pids if _alive(pid)], output
    assert _processes_mentioning(str(tmp_path)) == []
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(("op-celery-demo-", "tmp"))]
    assert left == []  # the demo's directory and the embedded server's are removed
