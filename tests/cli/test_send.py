"""``op-celery send``: one event straight to the stand-in API, or onto the queue."""

from __future__ import annotations

import pytest
import redis

from op_celery.dead_letters import DeadLetterStore
from op_celery.testing import StandInServer

from ._support import one_line_error, run


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


def test_send_revenue_sends_a_revenue_track_event_with_its_amount_and_device(
    cli_env: dict[str, str], stand_in: StandInServer
) -> None:
    result = run(
        "send", "revenue", "--amount", "1299", "--property", "currency=USD",
        "--profile-id", "u1", "--device-id", "cookie-abc",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    [received] = stand_in.received
    assert received.type == "track" and received.payload["name"] == "revenue"
    properties = received.payload["properties"]
    assert (properties["__revenue"], properties["currency"]) == (1299, "USD")
    assert properties["__deviceId"] == "cookie-abc"
    refused = one_line_error(run("send", "revenue", "--amount", "-5"))
    assert "revenue: amount is -5" in refused
    assert len(stand_in.requests) == 1


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


def test_send_promises_no_retry_and_no_replay_it_does_not_make(
    cli_env: dict[str, str], stand_in: StandInServer, store: DeadLetterStore
) -> None:
    stand_in.fail_next(1, 503)
    server_error = one_line_error(run("send", "track", "--name", "signup"))
    assert "HTTP 503" in server_error and "sent once, not retried" in server_error
    assert "will retry" not in server_error and "--enqueue" in server_error

    stand_in.fail_next(1, 429, headers={"retry-after": "7"})
    limited = one_line_error(run("send", "track", "--name", "signup"))
    assert "HTTP 429" in limited and "send again after 7 s" in limited
    assert "will retry" not in limited

    invalid = one_line_error(run("send", "increment", "--profile-id", "nobody-yet",
                                 "--property-name", "visits"))  # fmt: skip
    assert "no such profile yet: send identify for it first" in invalid

    assert len(stand_in.requests) == 3  # each sent once
    assert len(store) == 0  # and nothing left to replay


def test_send_refused_for_its_credentials_says_to_send_again_not_to_replay(
    cli_env: dict[str, str], stand_in: StandInServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENPANEL_CLIENT_SECRET", "wrong-secret")
    error = one_line_error(run("send", "track", "--name", "signup"))
    assert "check OPENPANEL_CLIENT_ID and OPENPANEL_CLIENT_SECRET" in error
    assert "replay" not in error and "dead letter" not in error
    assert error.endswith("then send again")
