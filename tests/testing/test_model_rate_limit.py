"""The model's rate limit (`_model`): fixed windows, header modes and the clock.

Windows run on a fake clock or `advance`, so no test waits for a window to pass.
"""

from __future__ import annotations

import pytest
import requests

from op_celery.testing import StandInServer

from ._support import AUTH, CLIENT_ID, OTHER_AUTH, SECRET, TRACK, FakeClock, post, rate_headers

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
