"""The API model (`_model`): recording, authentication, profiles, faults, waiting, reset.

`fail_for` runs on a fake clock, so no test waits for an outage to pass.
"""

from __future__ import annotations

import threading
import time

import pytest
import requests

from op_celery.testing import Received, StandInControl, StandInServer
from op_celery.testing._profiles import PROFILE_FLUSH_INTERVAL_S

from ._support import (
    AUTH,
    BROWSER,
    CLIENT_ID,
    OTHER_AUTH,
    OTHER_SECRET,
    SECRET,
    TIMEOUT_S,
    TRACK,
    FakeClock,
    post,
)


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


def test_credentials_in_the_body_are_accepted_as_the_server_reads_them(
    server: StandInServer, clock: FakeClock
) -> None:
    body = {**TRACK, "clientId": CLIENT_ID, "clientSecret": SECRET}
    response = post(server, body, headers={})
    assert response.status_code == 200
    assert post(server, {**TRACK, "clientId": CLIENT_ID}, headers={}).text == (
        "Ingestion: Invalid cors or secret"
    )
    # Headers win over the body; the body fills in what the headers lack.
    wrong = {**TRACK, "clientId": CLIENT_ID, "clientSecret": "wrong"}
    assert post(server, wrong).status_code == 200
    half = {**TRACK, "clientSecret": SECRET}
    assert post(server, half, headers={"openpanel-client-id": CLIENT_ID}).status_code == 200
    # The body's client owns what it writes.
    identify = {"type": "identify", "payload": {"profileId": "b1"}, "clientId": CLIENT_ID,
                "clientSecret": SECRET}  # fmt: skip
    assert post(server, identify, headers={}).status_code == 200
    clock.advance(PROFILE_FLUSH_INTERVAL_S)
    assert server.profile("b1", CLIENT_ID) == {}


def test_credentials_in_the_body_must_be_strings(server: StandInServer) -> None:
    response = post(server, {**TRACK, "clientId": 7, "clientSecret": SECRET}, headers={})
    assert response.status_code == 400
    assert response.json()["message"] == (
        "body/clientId Invalid input: expected string, received number"
    )


def test_the_legacy_mixan_headers_are_read_too(server: StandInServer) -> None:
    headers = {"mixan-client-id": CLIENT_ID, "mixan-client-secret": SECRET}
    assert post(server, TRACK, headers=headers).status_code == 200


def test_null_groups_are_accepted_as_the_server_accepts_them(server: StandInServer) -> None:
    body = {"type": "track", "payload": {"name": "x", "groups": None}}
    assert post(server, body).status_code == 200


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
def test_increment_succeeds_once_an_identify_was_flushed(
    server: StandInServer, clock: FakeClock, kind: str
) -> None:
    body = {"type": kind, "payload": {"profileId": "u1", "property": "n", "value": 2}}
    assert post(server, body).status_code == 404
    assert post(server, {"type": "identify", "payload": {"profileId": "u1"}}).status_code == 200
    assert post(server, body).status_code == 404  # in the profile buffer, not flushed yet
    clock.advance(PROFILE_FLUSH_INTERVAL_S)
    assert post(server, body).status_code == 200


def test_a_browser_track_with_a_profile_id_makes_the_profile_known(
    server: StandInServer, clock: FakeClock
) -> None:
    # The server writes the profile when a browser's event opens its session.
    headers = {**AUTH, "user-agent": BROWSER}
    post(server, {"type": "track", "payload": {"name": "a", "profileId": "u2"}}, headers=headers)
    clock.advance(PROFILE_FLUSH_INTERVAL_S)
    body = {"type": "increment", "payload": {"profileId": "u2", "property": "n"}}
    assert post(server, body).status_code == 200


def test_a_server_track_with_a_profile_id_leaves_the_profile_unknown(
    server: StandInServer, clock: FakeClock
) -> None:
    # A server event opens no session, so the server never writes its profile.
    headers = {**AUTH, "user-agent": "python-requests/2.32.3"}
    post(server, {"type": "track", "payload": {"name": "a", "profileId": "u5"}}, headers=headers)
    post(server, {"type": "track", "payload": {"name": "a", "profileId": "u5"}})  # no user agent
    clock.advance(PROFILE_FLUSH_INTERVAL_S)
    body = {"type": "increment", "payload": {"profileId": "u5", "property": "n"}}
    assert post(server, body).status_code == 404


def test_a_numeric_profile_id_matches_its_string_form(
    server: StandInServer, clock: FakeClock
) -> None:
    post(server, {"type": "identify", "payload": {"profileId": 42}})
    clock.advance(PROFILE_FLUSH_INTERVAL_S)
    body = {"type": "increment", "payload": {"profileId": "42", "property": "n"}}
    assert post(server, body).status_code == 200


def test_a_refused_identify_does_not_make_the_profile_known(
    server: StandInServer, clock: FakeClock
) -> None:
    post(server, {"type": "identify", "payload": {"profileId": "u3"}}, headers={})
    clock.advance(PROFILE_FLUSH_INTERVAL_S)
    body = {"type": "increment", "payload": {"profileId": "u3", "property": "n"}}
    assert post(server, body).status_code == 404


def test_profiles_belong_to_the_client_that_identified_them(
    server: StandInServer, clock: FakeClock
) -> None:
    post(server, {"type": "identify", "payload": {"profileId": "u4"}}, headers=OTHER_AUTH)
    clock.advance(PROFILE_FLUSH_INTERVAL_S)
    body = {"type": "increment", "payload": {"profileId": "u4", "property": "n"}}
    assert post(server, body).status_code == 404
    assert post(server, body, headers=OTHER_AUTH).status_code == 200


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
