"""The stand-in OpenPanel server (`op_celery.testing`), over real HTTP with ``requests``.

Rate-limit windows and `fail_for` run on a fake clock, so no test waits for a window to pass.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

import op_celery.testing
from op_celery.testing import Received, StandInControl, StandInServer
from op_celery.testing.__main__ import parse_client, parse_rate_limit

CLIENT_ID = "0b6f5e1c-2d3a-4b5c-8d9e-0f1a2b3c4d5e"
SECRET = "sec_stand-in-test"
OTHER_CLIENT_ID = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"
OTHER_SECRET = "sec_other"
AUTH = {"openpanel-client-id": CLIENT_ID, "openpanel-client-secret": SECRET}
OTHER_AUTH = {"openpanel-client-id": OTHER_CLIENT_ID, "openpanel-client-secret": OTHER_SECRET}
#: Every request in these tests gives up after this many seconds rather than hang the suite.
TIMEOUT_S = 5.0
TRACK = {"type": "track", "payload": {"name": "signup"}}


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def server(clock: FakeClock) -> Iterator[StandInServer]:
    with StandInServer({CLIENT_ID: SECRET, OTHER_CLIENT_ID: OTHER_SECRET}, clock=clock) as server:
        yield server


def post(
    server: StandInServer,
    body: Any,
    headers: dict[str, str] | None = None,
    session: requests.Session | None = None,
    **kwargs: Any,
) -> requests.Response:
    sender = session or requests
    return sender.post(
        f"{server.url}/track",
        json=body,
        headers=AUTH if headers is None else headers,
        timeout=kwargs.pop("timeout", TIMEOUT_S),
        **kwargs,
    )


def stand_in_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("op-celery-stand-in")]


# --- Public API. -------------------------------------------------------------------------


def test_all_names_exactly_what_the_package_exports() -> None:
    public = {name for name in vars(op_celery.testing) if not name.startswith("_")}
    assert (
        set(op_celery.testing.__all__)
        == public
        == {
            "Received",
            "StandInControl",
            "StandInServer",
        }
    )


def test_url_is_an_http_loopback_address_with_the_bound_port(server: StandInServer) -> None:
    assert server.url.startswith("http://127.0.0.1:")
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S):
        pass


def test_add_client_refuses_an_id_the_real_server_would_never_accept() -> None:
    with pytest.raises(ValueError, match="UUID"):
        StandInServer({"not-a-uuid": "secret"})
    with pytest.raises(ValueError, match="UUID"):
        StandInServer({CLIENT_ID.upper(): "secret"})


def test_a_server_starts_only_once_and_has_no_url_when_stopped() -> None:
    server = StandInServer({CLIENT_ID: SECRET})
    with pytest.raises(RuntimeError):
        _ = server.url
    with server, pytest.raises(RuntimeError):
        server.start()
    with pytest.raises(RuntimeError):
        _ = server.url
    with pytest.raises(RuntimeError):
        server.start()
    server.stop()  # a second stop does nothing


# --- Accepted events. ----------------------------------------------------------------------


def test_a_valid_track_gets_200_with_device_and_session_ids(server: StandInServer) -> None:
    response = post(server, TRACK)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    content = response.json()
    assert set(content) == {"deviceId", "sessionId"}
    assert isinstance(content["deviceId"], str) and content["deviceId"]
    assert isinstance(content["sessionId"], str)


def test_a_device_id_property_becomes_the_answered_device_id(server: StandInServer) -> None:
    body = {"type": "track", "payload": {"name": "x", "properties": {"__deviceId": "dev-1"}}}
    assert post(server, body).json()["deviceId"] == "dev-1"


def test_accepted_requests_are_recorded_with_type_payload_status_and_arrival_time(
    server: StandInServer,
) -> None:
    before = time.time()
    post(server, {"type": "track", "payload": {"name": "signup", "properties": {"plan": "pro"}}})
    after = time.time()
    [received] = server.received
    assert isinstance(received, Received)
    assert received.type == "track"
    assert received.payload == {"name": "signup", "properties": {"plan": "pro"}}
    assert received.status == 200
    assert before <= received.at <= after
    with pytest.raises(AttributeError):
        received.status = 500  # type: ignore[misc]


def test_headers_are_recorded_with_lower_case_names(server: StandInServer) -> None:
    headers = {
        **AUTH,
        "OpenPanel-Client-IP": "203.0.113.7",
        "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/130.0",
        "Request-Id": "req-123",
    }
    post(server, TRACK, headers=headers)
    recorded = server.received[0].headers
    assert recorded["openpanel-client-ip"] == "203.0.113.7"
    assert recorded["user-agent"] == "Mozilla/5.0 (X11; Linux x86_64) Firefox/130.0"
    assert recorded["request-id"] == "req-123"
    assert recorded["openpanel-client-secret"] == SECRET
    assert all(name == name.lower() for name in recorded)


def test_received_and_requests_are_snapshots_not_live_lists(server: StandInServer) -> None:
    snapshot = server.received
    post(server, TRACK)
    assert snapshot == []
    assert len(server.received) == 1
    server.received.clear()
    assert len(server.received) == 1


def test_requests_hold_every_answered_request_and_received_only_the_accepted(
    server: StandInServer,
) -> None:
    post(server, TRACK)
    post(server, TRACK, headers={})
    post(server, {"type": "track", "payload": {"name": ""}})
    assert [r.status for r in server.requests] == [200, 401, 400]
    assert [r.status for r in server.received] == [200]
    assert server.counts() == {200: 1, 401: 1, 400: 1}


def test_many_threads_sending_at_once_are_all_recorded(server: StandInServer) -> None:
    def send_some() -> None:
        with requests.Session() as session:
            for _ in range(25):
                assert post(server, TRACK, session=session).status_code == 200

    threads = [threading.Thread(target=send_some) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S * 10)
    assert len(server.received) == 100
    assert server.counts() == {200: 100}


@pytest.mark.parametrize(
    "body",
    [
        {"type": "track", "payload": {"name": "x" * 80}},
        {"type": "track", "payload": {"name": "🎉" * 40}},  # 80 UTF-16 units, as JS counts
        {"type": "track", "payload": {"name": "a", "profileId": 42}},
        {"type": "track", "payload": {"name": "a", "profileId": "u1", "groups": ["g1"]}},
        {"type": "track", "payload": {"name": "revenue", "properties": {"__revenue": 1999}}},
        {"type": "track", "payload": {"name": "revenue", "properties": {"__revenue": None}}},
        {"type": "track", "payload": {"name": "revenue"}},
        {"type": "track", "payload": {"name": "a", "unknownKey": True}},
        {"type": "track", "payload": {"name": "view.php"}},  # only "/….php" paths are scans
        {
            "type": "identify",
            "payload": {
                "profileId": "u1",
                "firstName": "Ada",
                "lastName": "Lovelace",
                "email": "ada+test@example.co.uk",
                "avatar": "https://cdn.example.com/a.png",
                "properties": {"plan": "pro"},
            },
        },
        {"type": "identify", "payload": {"profileId": 7}},
        {"type": "group", "payload": {"id": "g1", "type": "company", "name": "Acme"}},
        {"type": "assign_group", "payload": {"groupIds": ["g1", "g2"]}},
        {"type": "assign_group", "payload": {"groupIds": [], "profileId": "u1"}},
    ],
)
def test_payloads_the_server_schema_accepts_get_200(server: StandInServer, body: Any) -> None:
    response = post(server, body)
    assert response.status_code == 200, response.text


# --- Validation (400), before authentication. ------------------------------------------------

INVALID_BODIES = [
    ({"type": "track", "payload": {"name": ""}}, "body/payload/name"),
    ({"type": "track", "payload": {}}, "body/payload/name"),
    ({"type": "track", "payload": {"name": 5}}, "body/payload/name"),
    ({"type": "track", "payload": {"name": "x" * 81}}, "body/payload/name"),
    ({"type": "track", "payload": {"name": "🎉" * 41}}, "body/payload/name"),
    ({"type": "track", "payload": {"name": "two\nlines"}}, "body/payload/name"),
    ({"type": "track", "payload": {"name": "carriage\rreturn"}}, "body/payload/name"),
    ({"type": "track", "payload": {"name": "session_start"}}, "body/payload/name"),
    ({"type": "track", "payload": {"name": "session_end"}}, "body/payload/name"),
    ({"type": "track", "payload": {"name": "../../etc/passwd"}}, "body/payload/name"),
    ({"type": "track", "payload": {"name": "${jndi:ldap://x}"}}, "body/payload/name"),
    ({"type": "track", "payload": {"name": "x' OR '1'='1"}}, "body/payload/name"),
    ({"type": "track", "payload": {"name": "/wp-login.php"}}, "body/payload/name"),
    ({"type": "track", "payload": {"name": "/.env"}}, "body/payload/name"),
    ({"type": "track", "payload": {"name": "a", "properties": []}}, "body/payload/properties"),
    ({"type": "track", "payload": {"name": "a", "profileId": None}}, "body/payload/profileId"),
    ({"type": "track", "payload": {"name": "a", "profileId": ""}}, "body/payload/profileId"),
    ({"type": "track", "payload": {"name": "a", "profileId": True}}, "body/payload/profileId"),
    ({"type": "track", "payload": {"name": "a", "groups": ["", "g"]}}, "body/payload/groups/0"),
    ({"type": "track", "payload": {"name": "a", "groups": "g"}}, "body/payload/groups"),
    (
        {"type": "track", "payload": {"name": "revenue", "properties": {"__revenue": 9.99}}},
        "body/payload/properties/__revenue",
    ),
    (
        {"type": "track", "payload": {"name": "revenue", "properties": {"__revenue": -1}}},
        "body/payload/properties/__revenue",
    ),
    (
        {"type": "track", "payload": {"name": "revenue", "properties": {"__revenue": "100"}}},
        "body/payload/properties/__revenue",
    ),
    ({"type": "identify", "payload": {}}, "body/payload/profileId"),
    ({"type": "identify", "payload": {"profileId": None}}, "body/payload/profileId"),
    ({"type": "identify", "payload": {"profileId": "u", "email": "nope"}}, "body/payload/email"),
    ({"type": "identify", "payload": {"profileId": "u", "email": "a@b"}}, "body/payload/email"),
    ({"type": "identify", "payload": {"profileId": "u", "avatar": "a.png"}}, "body/payload/avatar"),
    (
        {"type": "identify", "payload": {"profileId": "u", "avatar": "https://"}},
        "body/payload/avatar",
    ),
    (
        {"type": "identify", "payload": {"profileId": "u", "firstName": None}},
        "body/payload/firstName",
    ),
    (
        {"type": "increment", "payload": {"profileId": "u", "property": "n", "value": None}},
        "body/payload/value",
    ),
    (
        {"type": "increment", "payload": {"profileId": "u", "property": "n", "value": 0}},
        "body/payload/value",
    ),
    (
        {"type": "increment", "payload": {"profileId": "u", "property": "n", "value": "1"}},
        "body/payload/value",
    ),
    ({"type": "increment", "payload": {"profileId": "u", "property": ""}}, "body/payload/property"),
    (
        {"type": "decrement", "payload": {"profileId": "u", "property": "n", "value": -2}},
        "body/payload/value",
    ),
    ({"type": "decrement", "payload": {"profileId": "u"}}, "body/payload/property"),
    ({"type": "alias", "payload": {"profileId": "u", "alias": ""}}, "body/payload/alias"),
    ({"type": "group", "payload": {"id": "", "type": "t", "name": "n"}}, "body/payload/id"),
    ({"type": "group", "payload": {"id": "g", "name": "n"}}, "body/payload/type"),
    ({"type": "assign_group", "payload": {"groupIds": "g1"}}, "body/payload/groupIds"),
    ({"type": "assign_group", "payload": {"groupIds": [1]}}, "body/payload/groupIds/0"),
    ({"type": "page_view", "payload": {"name": "x"}}, "body/type"),
    ({"payload": {"name": "x"}}, "body/type"),
    ({"type": "track"}, "body/payload"),
    ({"type": "track", "payload": "signup"}, "body/payload"),
    (["track"], "body"),
]


@pytest.mark.parametrize(("body", "path"), INVALID_BODIES)
def test_an_invalid_body_gets_400_naming_the_field(
    server: StandInServer, body: Any, path: str
) -> None:
    response = post(server, body)
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"status": 400, "error": "Error", "message": f"{path} Invalid input"}


@pytest.mark.parametrize(
    "headers", [{}, {"openpanel-client-id": "nope"}, {**AUTH, "openpanel-client-secret": "wrong"}]
)
def test_body_validation_runs_before_authentication(
    server: StandInServer, headers: dict[str, str]
) -> None:
    response = post(server, {"type": "track", "payload": {"name": ""}}, headers=headers)
    assert response.status_code == 400


def test_every_failing_field_is_named_in_one_message(server: StandInServer) -> None:
    response = post(server, {"type": "increment", "payload": {"property": ""}})
    assert response.json()["message"] == (
        "body/payload/profileId Invalid input, body/payload/property Invalid input"
    )


def test_recorded_requests_keep_the_payload_as_sent(server: StandInServer) -> None:
    post(server, {"type": "track", "payload": {"name": "", "extra": 1}})
    [request] = server.requests
    assert (request.type, request.payload, request.status) == (
        "track",
        {"name": "", "extra": 1},
        400,
    )


@pytest.mark.parametrize("raw", [b"{not json", b'{"type": "track", "payload": {"name": NaN}}'])
def test_a_body_that_is_not_json_gets_400_json(server: StandInServer, raw: bytes) -> None:
    response = requests.post(
        f"{server.url}/track",
        data=raw,
        headers={**AUTH, "content-type": "application/json"},
        timeout=TIMEOUT_S,
    )
    assert response.status_code == 400
    assert response.json()["status"] == 400
    [request] = server.requests
    assert (request.type, request.payload) == ("", {})


def test_an_empty_json_body_gets_400(server: StandInServer) -> None:
    response = requests.post(
        f"{server.url}/track",
        data=b"",
        headers={**AUTH, "content-type": "application/json"},
        timeout=TIMEOUT_S,
    )
    assert response.status_code == 400


def test_a_plain_text_body_fails_validation_like_any_non_object(server: StandInServer) -> None:
    response = requests.post(
        f"{server.url}/track",
        data=json.dumps(TRACK),
        headers={**AUTH, "content-type": "text/plain"},
        timeout=TIMEOUT_S,
    )
    assert response.status_code == 400
    assert response.json()["message"] == "body Invalid input"


def test_a_body_of_another_media_type_gets_415(server: StandInServer) -> None:
    response = requests.post(
        f"{server.url}/track",
        data=b"type=track",
        headers={**AUTH, "content-type": "application/x-www-form-urlencoded"},
        timeout=TIMEOUT_S,
    )
    assert response.status_code == 415


def test_a_body_over_one_mebibyte_gets_413(server: StandInServer) -> None:
    big = {"type": "track", "payload": {"name": "x", "properties": {"blob": "a" * 1_100_000}}}
    assert post(server, big).status_code == 413


# --- Authentication (401, plain text). -------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "Ingestion: Missing client id"),
        ({"openpanel-client-secret": SECRET}, "Ingestion: Missing client id"),
        ({"openpanel-client-id": "not-a-uuid"}, "Ingestion: Client ID must be a valid UUIDv4"),
        (
            {**AUTH, "openpanel-client-id": CLIENT_ID.upper()},
            "Ingestion: Client ID must be a valid UUIDv4",
        ),
        (
            {**AUTH, "openpanel-client-id": "11111111-2222-4333-8444-555555555555"},
            "Ingestion: Invalid client id",
        ),
        ({**AUTH, "openpanel-client-secret": "wrong"}, "Ingestion: Invalid cors or secret"),
        ({"openpanel-client-id": CLIENT_ID}, "Ingestion: Invalid cors or secret"),
        ({**AUTH, "openpanel-client-secret": OTHER_SECRET}, "Ingestion: Invalid cors or secret"),
    ],
)
def test_bad_credentials_get_401_with_a_plain_text_reason(
    server: StandInServer, headers: dict[str, str], message: str
) -> None:
    response = post(server, TRACK, headers=headers)
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == message


def test_a_client_added_while_running_is_accepted(server: StandInServer) -> None:
    new_id = "99999999-8888-4777-8666-555555555555"
    headers = {"openpanel-client-id": new_id, "openpanel-client-secret": "s"}
    assert post(server, TRACK, headers=headers).status_code == 401
    server.add_client(new_id, "s")
    assert post(server, TRACK, headers=headers).status_code == 200


# --- Alias and profiles. -------------------------------------------------------------------

ALIAS = {"type": "alias", "payload": {"profileId": "u1", "alias": "anon-1"}}


def test_a_valid_alias_gets_400_alias_is_not_supported(server: StandInServer) -> None:
    response = post(server, ALIAS)
    assert response.status_code == 400
    assert response.json() == {
        "status": 400,
        "error": "Bad Request",
        "message": "Alias is not supported",
    }


def test_an_alias_with_bad_credentials_gets_401_first(server: StandInServer) -> None:
    assert post(server, ALIAS, headers={}).status_code == 401


@pytest.mark.parametrize("kind", ["increment", "decrement"])
def test_increment_on_a_profile_never_seen_gets_404(server: StandInServer, kind: str) -> None:
    response = post(server, {"type": kind, "payload": {"profileId": "ghost", "property": "n"}})
    assert response.status_code == 404
    assert response.json() == {"status": 404, "message": "Profile not found"}


@pytest.mark.parametrize("kind", ["increment", "decrement"])
def test_increment_succeeds_once_an_identify_was_accepted(server: StandInServer, kind: str) -> None:
    body = {"type": kind, "payload": {"profileId": "u1", "property": "n", "value": 2}}
    assert post(server, body).status_code == 404
    assert post(server, {"type": "identify", "payload": {"profileId": "u1"}}).status_code == 200
    assert post(server, body).status_code == 200


def test_a_track_with_a_profile_id_makes_the_profile_known(server: StandInServer) -> None:
    post(server, {"type": "track", "payload": {"name": "a", "profileId": "u2"}})
    body = {"type": "increment", "payload": {"profileId": "u2", "property": "n"}}
    assert post(server, body).status_code == 200


def test_a_numeric_profile_id_matches_its_string_form(server: StandInServer) -> None:
    post(server, {"type": "identify", "payload": {"profileId": 42}})
    body = {"type": "increment", "payload": {"profileId": "42", "property": "n"}}
    assert post(server, body).status_code == 200


def test_a_refused_identify_does_not_make_the_profile_known(server: StandInServer) -> None:
    post(server, {"type": "identify", "payload": {"profileId": "u3"}}, headers={})
    body = {"type": "increment", "payload": {"profileId": "u3", "property": "n"}}
    assert post(server, body).status_code == 404


def test_profiles_belong_to_the_client_that_identified_them(server: StandInServer) -> None:
    post(server, {"type": "identify", "payload": {"profileId": "u4"}}, headers=OTHER_AUTH)
    body = {"type": "increment", "payload": {"profileId": "u4", "property": "n"}}
    assert post(server, body).status_code == 404
    assert post(server, body, headers=OTHER_AUTH).status_code == 200


# --- Rate limit (fake clock). ----------------------------------------------------------------


def test_over_the_limit_gets_429_with_retry_after_and_ratelimit_headers(
    server: StandInServer, clock: FakeClock
) -> None:
    server.set_rate_limit(2, 10)
    first = post(server, TRACK)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit"] == "2"
    assert first.headers["x-ratelimit-remaining"] == "1"
    assert first.headers["x-ratelimit-reset"] == "10"
    assert post(server, TRACK).headers["x-ratelimit-remaining"] == "0"
    clock.advance(3.5)
    refused = post(server, TRACK)
    assert refused.status_code == 429
    assert refused.json() == {
        "status": 429,
        "error": "Too Many Requests",
        "message": "You have exceeded the rate limit for this endpoint.",
    }
    assert refused.headers["retry-after"] == "7"  # 6.5 s left, rounded up
    assert refused.headers["x-ratelimit-limit"] == "2"
    assert refused.headers["x-ratelimit-remaining"] == "0"
    assert refused.headers["x-ratelimit-reset"] == "7"
    assert server.counts() == {200: 2, 429: 1}


def test_retry_after_is_at_least_one_second(server: StandInServer, clock: FakeClock) -> None:
    server.set_rate_limit(1, 10)
    post(server, TRACK)
    clock.advance(9.99)
    assert post(server, TRACK).headers["retry-after"] == "1"


def test_the_window_reopens_after_window_seconds_and_refusals_do_not_carry_over(
    server: StandInServer, clock: FakeClock
) -> None:
    server.set_rate_limit(2, 10)
    statuses = [post(server, TRACK).status_code for _ in range(6)]
    assert statuses == [200, 200, 429, 429, 429, 429]
    clock.advance(10)
    statuses = [post(server, TRACK).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]


def test_each_client_id_has_its_own_window(server: StandInServer) -> None:
    server.set_rate_limit(1, 10)
    assert post(server, TRACK).status_code == 200
    assert post(server, TRACK).status_code == 429
    assert post(server, TRACK, headers=OTHER_AUTH).status_code == 200


def test_the_limit_counts_requests_at_arrival_before_validation_and_auth(
    server: StandInServer,
) -> None:
    server.set_rate_limit(1, 10)
    bad = {"type": "track", "payload": {"name": ""}}
    wrong_secret = {**AUTH, "openpanel-client-secret": "wrong"}
    assert post(server, bad, headers=wrong_secret).status_code == 400
    assert post(server, bad, headers=wrong_secret).status_code == 429
    assert post(server, TRACK).status_code == 429


def test_the_limit_counts_when_the_request_arrives_not_when_it_is_answered(
    server: StandInServer, clock: FakeClock
) -> None:
    server.set_rate_limit(1, 10)
    clock.advance(5)
    server.set_latency(0.05)
    assert post(server, TRACK).status_code == 200  # opens the window at arrival, t=1005
    clock.advance(9.9)
    assert post(server, TRACK).headers["retry-after"] == "1"


def test_a_rate_limit_given_to_the_constructor_applies(clock: FakeClock) -> None:
    with StandInServer({CLIENT_ID: SECRET}, rate_limit=(1, 60), clock=clock) as server:
        assert post(server, TRACK).status_code == 200
        assert post(server, TRACK).status_code == 429


def test_set_rate_limit_none_lifts_the_limit(server: StandInServer) -> None:
    server.set_rate_limit(1, 10)
    post(server, TRACK)
    server.set_rate_limit(None)
    response = post(server, TRACK)
    assert response.status_code == 200
    assert "x-ratelimit-limit" not in response.headers


@pytest.mark.parametrize(("limit", "window"), [(0, 1.0), (1, 0.0), (1, None)])
def test_set_rate_limit_refuses_nonsense(
    server: StandInServer, limit: int, window: float | None
) -> None:
    with pytest.raises(ValueError):
        server.set_rate_limit(limit, window)


RATE_HEADERS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "retry-after")


def rate_headers(response: requests.Response) -> dict[str, str]:
    return {name: response.headers[name] for name in RATE_HEADERS if name in response.headers}


def test_by_default_every_answer_counted_against_the_window_carries_the_three_headers(
    server: StandInServer,
) -> None:
    server.set_rate_limit(6, 10)
    answers = [
        post(server, TRACK),  # 200
        post(server, {"type": "track", "payload": {"name": ""}}),  # 400
        post(server, TRACK, headers={**AUTH, "openpanel-client-secret": "wrong"}),  # 401
        post(server, {"type": "increment", "payload": {"profileId": "x", "property": "n"}}),
        requests.post(  # 415
            f"{server.url}/track", data=b"x", headers={**AUTH, "content-type": "text/csv"}
        ),
    ]
    assert [a.status_code for a in answers] == [200, 400, 401, 404, 415]
    assert [rate_headers(a) for a in answers] == [
        {"x-ratelimit-limit": "6", "x-ratelimit-remaining": str(5 - i), "x-ratelimit-reset": "10"}
        for i in range(5)
    ]


def test_header_mode_retry_after_sends_only_retry_after_and_only_on_429(
    server: StandInServer, clock: FakeClock
) -> None:
    server.set_rate_limit(1, 10, headers="retry-after")
    accepted = post(server, TRACK)
    clock.advance(2.5)
    refused = post(server, TRACK)
    assert (accepted.status_code, refused.status_code) == (200, 429)
    assert rate_headers(accepted) == {}
    assert rate_headers(refused) == {"retry-after": "8"}
    assert refused.json()["message"] == "You have exceeded the rate limit for this endpoint."


def test_header_mode_none_sends_a_bare_429(server: StandInServer) -> None:
    server.set_rate_limit(1, 10, headers="none")
    accepted, refused = post(server, TRACK), post(server, TRACK)
    assert (accepted.status_code, refused.status_code) == (200, 429)
    assert rate_headers(accepted) == rate_headers(refused) == {}
    assert refused.json() == {
        "status": 429,
        "error": "Too Many Requests",
        "message": "You have exceeded the rate limit for this endpoint.",
    }


def test_a_header_mode_given_to_the_constructor_applies(clock: FakeClock) -> None:
    with StandInServer(
        {CLIENT_ID: SECRET}, rate_limit=(1, 60), rate_limit_headers="retry-after", clock=clock
    ) as server:
        assert rate_headers(post(server, TRACK)) == {}
        assert rate_headers(post(server, TRACK)) == {"retry-after": "60"}


def test_an_unknown_header_mode_is_refused_naming_the_modes(server: StandInServer) -> None:
    with pytest.raises(ValueError, match="'all', 'retry-after', 'none'"):
        server.set_rate_limit(1, 10, headers="some")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'all', 'retry-after', 'none'"):
        StandInServer(rate_limit_headers="some")  # type: ignore[arg-type]


def test_a_limit_changed_mid_run_applies_from_the_next_request_in_a_fresh_window(
    server: StandInServer, clock: FakeClock
) -> None:
    server.set_rate_limit(1, 10)
    assert [post(server, TRACK).status_code for _ in range(2)] == [200, 429]
    clock.advance(4)
    server.set_rate_limit(3, 5)
    answers = [post(server, TRACK) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert answers[0].headers["x-ratelimit-limit"] == "3"
    assert answers[0].headers["x-ratelimit-reset"] == "5"
    clock.advance(5)
    assert post(server, TRACK).status_code == 200


def test_advance_moves_the_window_clock_without_sleeping() -> None:
    with StandInServer({CLIENT_ID: SECRET}, rate_limit=(1, 3600)) as server:  # the real clock
        assert [post(server, TRACK).status_code for _ in range(2)] == [200, 429]
        server.advance(3599)
        refused = post(server, TRACK)
        assert (refused.status_code, refused.headers["retry-after"]) == (429, "1")
        server.advance(1)
        assert post(server, TRACK).status_code == 200


def test_advance_adds_to_a_given_clock_ends_outages_and_stays_across_reset(
    server: StandInServer, clock: FakeClock
) -> None:
    server.set_rate_limit(1, 10)
    post(server, TRACK)
    server.advance(4)
    clock.advance(4)
    assert post(server, TRACK).headers["retry-after"] == "2"
    server.fail_for(30, status=503)
    server.advance(30)
    assert post(server, TRACK).status_code == 200  # the outage is over, a new window opened
    server.reset()
    server.fail_for(1, status=503)
    assert post(server, TRACK).status_code == 503  # reset kept the advance: outage from now


@pytest.mark.parametrize("seconds", [-1.0, float("inf"), float("nan")])
def test_advance_refuses_going_back_or_to_infinity(server: StandInServer, seconds: float) -> None:
    with pytest.raises(ValueError):
        server.advance(seconds)


# --- Injected faults. ----------------------------------------------------------------------


def test_fail_next_answers_the_next_count_requests_then_recovers(server: StandInServer) -> None:
    server.fail_next(2)
    first, second, third = (post(server, TRACK) for _ in range(3))
    assert (first.status_code, second.status_code, third.status_code) == (503, 503, 200)
    assert first.text == "Service Unavailable"
    assert [r.status for r in server.requests] == [503, 503, 200]
    assert len(server.received) == 1


def test_fail_next_comes_before_validation_and_auth(server: StandInServer) -> None:
    server.fail_next(1, status=500)
    response = post(server, {"type": "nonsense"}, headers={})
    assert response.status_code == 500
    assert response.text == "Internal server error"
    assert response.headers["content-type"].startswith("text/plain")


@pytest.mark.parametrize("status", [502, 504])
def test_gateway_faults_answer_a_proxy_html_page(server: StandInServer, status: int) -> None:
    server.fail_next(1, status=status)
    response = post(server, TRACK)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("text/html")
    assert "<html>" in response.text


def test_fail_next_sends_the_given_body_and_headers(server: StandInServer) -> None:
    server.fail_next(
        1,
        status=429,
        body='{"status":429,"message":"slow down"}',
        headers={"Retry-After": "3"},
    )
    response = post(server, TRACK)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"status": 429, "message": "slow down"}


def test_faults_are_served_in_the_order_they_were_queued(server: StandInServer) -> None:
    server.fail_next(1, status=500)
    server.drop_next(1)
    server.fail_next(1, status=502)
    assert post(server, TRACK).status_code == 500
    with pytest.raises(requests.ConnectionError):
        post(server, TRACK)
    assert post(server, TRACK).status_code == 502
    assert post(server, TRACK).status_code == 200


def test_fail_for_answers_every_request_until_the_time_has_passed(
    server: StandInServer, clock: FakeClock
) -> None:
    server.fail_for(30, status=502)
    assert post(server, TRACK).status_code == 502
    clock.advance(29.9)
    assert post(server, TRACK).status_code == 502
    clock.advance(0.1)
    assert post(server, TRACK).status_code == 200


def test_drop_next_closes_the_connection_without_an_answer(server: StandInServer) -> None:
    server.drop_next(1)
    with requests.Session() as session:
        with pytest.raises(requests.ConnectionError):
            post(server, TRACK, session=session)
        assert post(server, TRACK, session=session).status_code == 200
    assert server.dropped == 1
    assert [r.status for r in server.requests] == [200]
    assert 0 not in server.counts()


def test_latency_delays_each_answer_by_at_least_the_set_time(server: StandInServer) -> None:
    server.set_latency(0.2)
    started = time.monotonic()
    assert post(server, TRACK).status_code == 200
    assert time.monotonic() - started >= 0.2


def test_latency_longer_than_the_client_timeout_makes_it_time_out(server: StandInServer) -> None:
    server.set_latency(2.0)
    with pytest.raises(requests.ReadTimeout):
        post(server, TRACK, timeout=0.1)


def test_control_endpoints_are_never_delayed_faulted_or_recorded(server: StandInServer) -> None:
    server.set_latency(30.0)
    server.fail_next(5)
    control = StandInControl(server.url, timeout=TIMEOUT_S)
    assert control.counts() == {}
    assert control.received() == []
    assert server.requests == []


# --- Waiting and resetting. ----------------------------------------------------------------


def test_wait_for_returns_true_once_enough_requests_were_accepted(server: StandInServer) -> None:
    sender = threading.Timer(0.05, lambda: [post(server, TRACK) for _ in range(3)])
    sender.start()
    try:
        assert server.wait_for(3, timeout=TIMEOUT_S)
    finally:
        sender.join(TIMEOUT_S)


def test_wait_for_returns_false_when_the_timeout_passes(server: StandInServer) -> None:
    post(server, TRACK, headers={})  # answered, but not accepted
    assert server.wait_for(1, timeout=0.05) is False


def test_reset_forgets_requests_faults_latency_profiles_and_windows(
    server: StandInServer,
) -> None:
    server.set_rate_limit(1, 10)
    post(server, {"type": "identify", "payload": {"profileId": "u1"}})
    server.fail_next(3)
    server.fail_for(60)
    server.drop_next(2)
    server.set_latency(30)
    server.reset()
    assert server.received == server.requests == []
    assert server.counts() == {}
    assert server.dropped == 0
    response = post(server, {"type": "increment", "payload": {"profileId": "u1", "property": "n"}})
    assert response.status_code == 404  # profile forgotten; no fault, no latency, fresh window
    assert post(server, TRACK).status_code == 429  # the rate-limit setting itself stays


# --- HTTP behaviour. -----------------------------------------------------------------------


def test_a_session_reuses_one_keep_alive_connection(server: StandInServer) -> None:
    with requests.Session() as session:
        responses = [post(server, TRACK, session=session) for _ in range(20)]
    assert all(r.status_code == 200 for r in responses)
    assert all(r.headers["connection"] == "keep-alive" for r in responses)
    assert all(int(r.headers["content-length"]) == len(r.content) for r in responses)
    assert server.connections == 1


def test_error_answers_keep_the_connection_usable(server: StandInServer) -> None:
    server.fail_next(1)
    with requests.Session() as session:
        statuses = [
            post(server, TRACK, session=session).status_code,
            post(server, TRACK, headers={}, session=session).status_code,
            post(server, {"type": "x"}, session=session).status_code,
            post(server, TRACK, session=session).status_code,
        ]
    assert statuses == [503, 401, 400, 200]
    assert server.connections == 1


def test_connection_close_from_the_client_is_honoured(server: StandInServer) -> None:
    headers = {**AUTH, "connection": "close"}
    with requests.Session() as session:
        for _ in range(2):
            response = post(server, TRACK, headers=headers, session=session)
            assert response.headers["connection"] == "close"
    assert server.connections == 2


def test_a_chunked_body_is_read(server: StandInServer) -> None:
    chunks = iter([b'{"type": "track", ', b'"payload": {"name": "chunked"}}'])
    response = requests.post(
        f"{server.url}/track",
        data=chunks,
        headers={**AUTH, "content-type": "application/json"},
        timeout=TIMEOUT_S,
    )
    assert response.status_code == 200
    assert server.received[0].headers["transfer-encoding"] == "chunked"
    assert server.received[0].payload == {"name": "chunked"}


@pytest.mark.parametrize(("method", "path"), [("POST", "/event"), ("GET", "/track"), ("POST", "/")])
def test_other_routes_get_404_and_are_not_recorded(
    server: StandInServer, method: str, path: str
) -> None:
    response = requests.request(method, f"{server.url}{path}", json=TRACK, timeout=TIMEOUT_S)
    assert response.status_code == 404
    assert server.requests == []


# --- The control endpoints and StandInControl. -----------------------------------------------


def test_control_endpoints_over_raw_http(server: StandInServer) -> None:
    base = f"{server.url}/__stand-in"
    assert requests.post(f"{base}/fail", json={"count": 1, "status": 500}, timeout=TIMEOUT_S).ok
    assert post(server, TRACK).status_code == 500
    post(server, TRACK)
    received = requests.get(f"{base}/received", timeout=TIMEOUT_S).json()
    assert [(r["type"], r["payload"], r["status"]) for r in received] == [
        ("track", {"name": "signup"}, 200)
    ]
    assert requests.get(f"{base}/counts", timeout=TIMEOUT_S).json() == {"200": 1, "500": 1}
    assert requests.post(f"{base}/rate-limit", json={"limit": 1, "window": 10}, timeout=5).ok
    assert post(server, TRACK).status_code == 200
    assert post(server, TRACK).status_code == 429
    assert requests.post(f"{base}/reset", timeout=TIMEOUT_S).ok
    assert requests.get(f"{base}/counts", timeout=TIMEOUT_S).json() == {}


def test_control_fail_with_seconds_starts_an_outage(server: StandInServer) -> None:
    response = requests.post(
        f"{server.url}/__stand-in/fail", json={"seconds": 60, "status": 504}, timeout=TIMEOUT_S
    )
    assert response.ok
    assert [post(server, TRACK).status_code for _ in range(2)] == [504, 504]


def test_control_endpoints_refuse_unknown_names_and_bad_bodies(server: StandInServer) -> None:
    base = f"{server.url}/__stand-in"
    assert requests.get(f"{base}/nothing", timeout=TIMEOUT_S).status_code == 404
    assert requests.post(f"{base}/fail", data=b"{", timeout=TIMEOUT_S).status_code == 400
    assert requests.post(f"{base}/fail", json={"status": 500}, timeout=TIMEOUT_S).status_code == 400
    wrong_body = {"count": 1, "body": 5}
    assert requests.post(f"{base}/fail", json=wrong_body, timeout=TIMEOUT_S).status_code == 400
    bad_limit = requests.post(f"{base}/rate-limit", json={"limit": 0, "window": 1}, timeout=5)
    assert bad_limit.status_code == 400
    bad_mode = {"limit": 1, "window": 1, "headers": "some"}
    bad_headers = requests.post(f"{base}/rate-limit", json=bad_mode, timeout=TIMEOUT_S)
    assert bad_headers.status_code == 400
    assert "retry-after" in bad_headers.json()["error"]
    back = requests.post(f"{base}/advance", json={"seconds": -1}, timeout=TIMEOUT_S)
    assert back.status_code == 400


def test_stand_in_control_drives_and_reads_the_server(
    server: StandInServer, clock: FakeClock
) -> None:
    control = StandInControl(server.url + "/", timeout=TIMEOUT_S)
    control.fail_next(1, status=502)
    control.drop_next(1)
    assert post(server, TRACK).status_code == 502
    with pytest.raises(requests.ConnectionError):
        post(server, TRACK)
    assert post(server, TRACK).status_code == 200
    assert control.counts() == {502: 1, 200: 1}
    assert [r.status for r in control.requests()] == [502, 200]
    [received] = control.received()
    assert received == server.received[0]
    assert control.stats()["dropped"] == 1
    assert control.wait_for(1, timeout=TIMEOUT_S)
    assert control.wait_for(2, timeout=0.05) is False

    control.fail_for(10, status=500)
    assert post(server, TRACK).status_code == 500
    clock.advance(10)
    control.set_rate_limit(1, 10)
    assert [post(server, TRACK).status_code for _ in range(2)] == [200, 429]
    control.set_rate_limit(1, 10, headers="none")
    assert [rate_headers(post(server, TRACK)) for _ in range(2)] == [{}, {}]
    control.advance(10)
    control.set_rate_limit(1, 10, headers="retry-after")
    post(server, TRACK)
    control.advance(6)
    assert rate_headers(post(server, TRACK)) == {"retry-after": "4"}
    control.set_rate_limit(None)
    control.set_latency(0.01)
    new_id = "12345678-1234-4234-8234-123456789abc"
    control.add_client(new_id, "new-secret")
    headers = {"openpanel-client-id": new_id, "openpanel-client-secret": "new-secret"}
    assert post(server, TRACK, headers=headers).status_code == 200
    control.reset()
    assert control.requests() == []


def test_stand_in_control_raises_with_the_servers_reason(server: StandInServer) -> None:
    with pytest.raises(RuntimeError, match="UUID"):
        StandInControl(server.url, timeout=TIMEOUT_S).add_client("nope", "s")


# --- Shutdown. -----------------------------------------------------------------------------


def test_stop_closes_the_port_and_open_connections_and_leaves_no_threads() -> None:
    server = StandInServer({CLIENT_ID: SECRET}).start()
    port = int(server.url.rsplit(":", 1)[1])
    idle = requests.Session()
    assert post(server, TRACK, session=idle).status_code == 200  # an idle keep-alive connection
    server.set_latency(60)
    outcome: list[BaseException | requests.Response] = []

    def send_and_wait() -> None:
        try:
            outcome.append(post(server, TRACK))
        except requests.RequestException as exc:
            outcome.append(exc)

    sleeping = threading.Thread(target=send_and_wait)
    sleeping.start()
    assert wait_until(lambda: len(stand_in_threads()) >= 3)  # accept loop + two connections
    server.stop()
    sleeping.join(TIMEOUT_S)
    assert not sleeping.is_alive()
    assert isinstance(outcome[0], requests.ConnectionError)  # woken and cut off, not answered
    assert stand_in_threads() == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S).close()
    idle.close()


def wait_until(condition: Any, timeout: float = TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# --- python -m op_celery.testing ------------------------------------------------------------


def test_parse_rate_limit_reads_limit_and_window() -> None:
    assert parse_rate_limit("50/1s") == (50, 1.0)
    assert parse_rate_limit("100/10") == (100, 10.0)
    assert parse_rate_limit("5/500ms") == (5, 0.5)
    assert parse_rate_limit("1000/1m") == (1000, 60.0)
    assert parse_client(f"{CLIENT_ID}:a:b") == (CLIENT_ID, "a:b")


def test_the_command_prints_the_url_serves_and_exits_0_on_sigterm() -> None:
    command = [sys.executable, "-m", "op_celery.testing", "--port", "0"]
    command += ["--client", f"{CLIENT_ID}:{SECRET}", "--rate-limit", "2/60s"]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Without PYTHONUNBUFFERED stdout is a buffered pipe: the code itself must flush.
        env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
    )
    try:
        assert process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            assert selector.select(timeout=15), "no URL line within 15 s"
        line = process.stdout.readline()
        assert line.startswith("OPENPANEL_API_URL=http://127.0.0.1:")
        url = line.strip().split("=", 1)[1]
        statuses = [
            requests.post(f"{url}/track", json=TRACK, headers=AUTH, timeout=TIMEOUT_S).status_code
            for _ in range(3)
        ]
        assert statuses == [200, 200, 429]
        control = StandInControl(url, timeout=TIMEOUT_S)
        assert control.counts() == {200: 2, 429: 1}
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        assert process.stdout.read() == ""  # exactly one line
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=15)


def test_the_command_refuses_a_malformed_client_with_exit_status_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "op_celery.testing", "--client", "no-secret"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "CLIENT_ID:SECRET" in result.stderr


def test_the_command_sends_the_rate_limit_header_mode_it_is_given() -> None:
    command = [sys.executable, "-m", "op_celery.testing", "--client", f"{CLIENT_ID}:{SECRET}"]
    command += ["--rate-limit", "1/60s", "--rate-limit-headers", "retry-after"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip().split("=", 1)[1]
        answers = [
            requests.post(f"{url}/track", json=TRACK, headers=AUTH, timeout=TIMEOUT_S)
            for _ in range(2)
        ]
        assert [a.status_code for a in answers] == [200, 429]
        assert [rate_headers(a) for a in answers] == [{}, {"retry-after": "60"}]
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0


def test_the_command_refuses_an_unknown_header_mode_with_exit_status_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "op_celery.testing", "--rate-limit-headers", "some"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "'retry-after'" in result.stderr
