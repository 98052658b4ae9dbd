"""What the stand-in answers (`_answers`): the 200 body with placeholder ids, the server's named
answers (bot, duplicate, filters, revenue, a captive portal) and the filters it models."""

from __future__ import annotations

import pytest

from op_celery.testing import StandInControl, StandInServer
from op_celery.testing._answers import IP_FILTERED, PROFILE_FILTERED, REVENUE_WITHOUT_SECRET

from ._support import AUTH, BROWSER, CLIENT_ID, TIMEOUT_S, TRACK, post

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


# --- The server's answers that are no plain status, by name (fail_next(n, "bot")). -------


@pytest.mark.parametrize(
    ("name", "status", "content_type", "body"),
    [
        ("bot", 202, "application/json", '{"bot":{"name":"Googlebot","type":"Search bot"}}'),
        ("duplicate", 200, "text/plain", "Duplicate event"),
        ("ip-filtered", 401, "text/plain", IP_FILTERED),
        ("profile-filtered", 401, "text/plain", PROFILE_FILTERED),
        ("revenue-without-secret", 401, "text/plain", REVENUE_WITHOUT_SECRET),
    ],
)
def test_a_named_answer_has_the_real_servers_status_body_and_content_type(
    server: StandInServer, name: str, status: int, content_type: str, body: str
) -> None:
    server.fail_next(1, name)
    response = post(server, TRACK)
    assert response.status_code == status
    assert response.headers["content-type"] == f"{content_type}; charset=utf-8"
    assert response.text == body
    assert post(server, TRACK).status_code == 200  # one answer, then the server again


def test_the_captive_portal_answers_200_with_an_html_page(server: StandInServer) -> None:
    server.fail_for(60, "captive-portal")
    response = post(server, TRACK)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.text.startswith("<!DOCTYPE html>")


def test_an_unknown_answer_name_is_refused_naming_the_known_ones(server: StandInServer) -> None:
    with pytest.raises(ValueError, match=r"'bot'.*'captive-portal'"):
        server.fail_next(1, "teapot")


def test_named_answers_are_driven_through_the_control_api(server: StandInServer) -> None:
    control = StandInControl(server.url, timeout=TIMEOUT_S)
    control.fail_next(1, "bot")
    control.fail_next(1, "duplicate")
    assert [post(server, TRACK).status_code for _ in range(3)] == [202, 200, 200]
    assert [r.status for r in server.requests] == [202, 200, 200]


# --- The project's filters and revenue without a secret, as the server checks them. -------


def test_a_filtered_client_ip_gets_the_ip_filter_401(server: StandInServer) -> None:
    server.set_filters(CLIENT_ID, ips=("203.0.113.9",))
    blocked = post(server, TRACK, {**AUTH, "openpanel-client-ip": "203.0.113.9"})
    assert (blocked.status_code, blocked.text) == (401, IP_FILTERED)
    assert blocked.headers["content-type"] == "text/plain; charset=utf-8"
    assert post(server, TRACK, {**AUTH, "openpanel-client-ip": "203.0.113.10"}).status_code == 200


def test_the_ip_filter_reads_the_first_public_ip_as_the_server_does(
    server: StandInServer,
) -> None:
    server.set_filters(CLIENT_ID, ips=("203.0.113.9",))
    # A private openpanel-client-ip is skipped; x-forwarded-for's first entry is the client.
    headers = {
        **AUTH,
        "openpanel-client-ip": "10.0.0.5",
        "x-forwarded-for": "203.0.113.9, 10.1.1.1",
    }
    assert post(server, TRACK, headers).text == IP_FILTERED


def test_a_filtered_profile_id_gets_the_profile_filter_401_before_the_secret(
    server: StandInServer,
) -> None:
    server.set_filters(CLIENT_ID, profile_ids=("spam-bot",))
    body = {"type": "identify", "payload": {"profileId": "spam-bot"}}
    wrong_secret = {**AUTH, "openpanel-client-secret": "wrong"}
    assert post(server, body, wrong_secret).text == PROFILE_FILTERED
    server.set_filters(CLIENT_ID)  # lifted
    assert post(server, body).status_code == 200


def test_revenue_without_a_secret_gets_the_revenue_401(server: StandInServer) -> None:
    body = {"type": "track", "payload": {"name": "revenue", "properties": {"__revenue": 990}}}
    without_secret = {"openpanel-client-id": CLIENT_ID}
    response = post(server, body, without_secret)
    assert (response.status_code, response.text) == (401, REVENUE_WITHOUT_SECRET)
    assert post(server, TRACK, without_secret).text == "Ingestion: Invalid cors or secret"


def test_filters_are_set_through_the_control_api_and_outlive_a_reset(
    server: StandInServer,
) -> None:
    StandInControl(server.url, timeout=TIMEOUT_S).set_filters(CLIENT_ID, profile_ids=("u9",))
    server.reset()
    body = {"type": "track", "payload": {"name": "x", "profileId": "u9"}}
    assert post(server, body).text == PROFILE_FILTERED


def test_a_server_event_gets_a_session_id_as_the_servers_answer_gives_it(
    server: StandInServer,
) -> None:
    # The API answers the session id it derives (getSessionId) for every event; only the
    # stored event of a server event has none. Same device, same 30-minute window: same id.
    first, second = (post(server, TRACK).json() for _ in range(2))
    assert first["sessionId"] and first == second
    browser = post(server, TRACK, headers={**AUTH, "user-agent": BROWSER}).json()
    assert browser["sessionId"] and browser["deviceId"] != first["deviceId"]
    assert browser["sessionId"] != first["sessionId"]


def test_the_session_id_follows_the_events_time_window() -> None:
    from op_celery.testing._answers import _session_id

    window_ms = 30 * 60 * 1000
    start = 1000 * window_ms
    assert _session_id("c", "d", start + 10_000) == _session_id("c", "d", start + window_ms - 1)
    assert _session_id("c", "d", start + 4_999) == _session_id("c", "d", start - 1)  # grace
    assert _session_id("c", "d", start + 5_000) != _session_id("c", "d", start - 1)
    assert len(_session_id("c", "d", start)) == 22  # 16 bytes, base64url without padding


@pytest.mark.parametrize(
    ("sent", "answered"),
    [("  dev-1  ", "dev-1"), ("x" * 64, "x" * 64), ("x" * 65, None), ("   ", None), (7, None)],
)
def test_a_device_id_property_is_answered_as_the_server_sanitizes_it(
    server: StandInServer, sent: object, answered: str | None
) -> None:
    body = {"type": "track", "payload": {"name": "x", "properties": {"__deviceId": sent}}}
    device_id = post(server, body).json()["deviceId"]
    if answered is None:  # ignored: the device id derived from IP and user agent
        assert device_id == post(server, TRACK).json()["deviceId"]
    else:
        assert device_id == answered


@pytest.mark.parametrize(
    ("user_agent", "server_event"),
    [(None, True), ("python-requests/2.32.3", True), ("Go Http Client/1.0", True),
     ("op-celery/1.0 (+https://example.com)", True), (BROWSER, False),
     ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X)", False)],
)  # fmt: skip
def test_server_events_are_told_by_the_servers_user_agent_rules(
    user_agent: str | None, server_event: bool
) -> None:
    from op_celery.testing._answers import is_server_event

    assert is_server_event(user_agent) is server_event
