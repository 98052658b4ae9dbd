"""The profile buffer (`_profiles`): profiles visible after a flush, values read as parseInt
reads them, writes merged as the server merges them; over HTTP on the fake clock."""

from __future__ import annotations

from typing import Any

import pytest

from op_celery.testing import StandInControl, StandInServer
from op_celery.testing._profiles import PROFILE_FLUSH_INTERVAL_S, ProfileStore, _parse_int

from ._support import CLIENT_ID, TIMEOUT_S, FakeClock, post


def identify(server: StandInServer, profile_id: str, properties: dict[str, Any]) -> None:
    body = {"type": "identify", "payload": {"profileId": profile_id, "properties": properties}}
    assert post(server, body).status_code == 200


def counter(
    server: StandInServer,
    profile_id: str,
    prop: str,
    value: float | None = None,
    kind: str = "increment",
) -> tuple[int, Any]:
    payload: dict[str, Any] = {"profileId": profile_id, "property": prop}
    if value is not None:
        payload["value"] = value
    response = post(server, {"type": kind, "payload": payload})
    return response.status_code, response.json()


def test_the_default_flush_interval_is_the_servers_ten_seconds() -> None:
    assert PROFILE_FLUSH_INTERVAL_S == 10.0
    assert StandInServer()._profile_flush_s == 10.0


def test_a_profile_is_not_found_until_the_flush_interval_has_passed(
    server: StandInServer, clock: FakeClock
) -> None:
    identify(server, "u1", {"visits": 3})
    assert counter(server, "u1", "visits")[0] == 404
    assert server.profile("u1", CLIENT_ID) is None
    clock.advance(PROFILE_FLUSH_INTERVAL_S - 0.5)
    assert counter(server, "u1", "visits")[0] == 404
    clock.advance(0.5)
    assert counter(server, "u1", "visits")[0] == 200
    clock.advance(PROFILE_FLUSH_INTERVAL_S)
    assert server.profile("u1", CLIENT_ID) == {"visits": 4}


def test_advance_moves_the_flush_clock_too(server: StandInServer) -> None:
    identify(server, "u1", {})
    server.advance(PROFILE_FLUSH_INTERVAL_S)
    assert server.profile("u1", CLIENT_ID) == {}


def test_a_flush_interval_of_zero_makes_writes_visible_at_once(server: StandInServer) -> None:
    server.set_profile_flush(0)
    identify(server, "u1", {"credits": 10})
    assert counter(server, "u1", "credits", 3, "decrement")[0] == 200
    assert counter(server, "u1", "credits", 2, "decrement")[0] == 200
    assert server.profile("u1", CLIENT_ID) == {"credits": 5}


def test_two_increments_within_one_flush_count_once_as_on_the_server(
    server: StandInServer, clock: FakeClock
) -> None:
    # Each reads the value of the last flush; the second one's write wins.
    identify(server, "u1", {"visits": 1})
    clock.advance(PROFILE_FLUSH_INTERVAL_S)
    assert counter(server, "u1", "visits")[0] == 200
    assert counter(server, "u1", "visits")[0] == 200
    clock.advance(PROFILE_FLUSH_INTERVAL_S)
    assert server.profile("u1", CLIENT_ID) == {"visits": 2}


@pytest.mark.parametrize(
    ("value", "after"),
    [("plenty", None), (True, None), ({"a": 1}, None), ("12abc", 13), (" 7", 8), (3.9, 4),
     (-2, -1), ([5, 6], 6), (None, 1), ("", 1), ([], 1)],  # the last three: never stored
)  # fmt: skip
def test_a_value_that_is_not_a_number_answers_400_with_the_servers_message(
    server: StandInServer, value: object, after: int | None
) -> None:
    server.set_profile_flush(0)
    identify(server, "u1", {"p": value, "keep": "x"})
    status, content = counter(server, "u1", "p")
    if after is None:
        assert (status, content) == (
            400,
            {"status": 400, "message": "Property value is not a number"},
        )
    else:
        assert status == 200
        assert server.profile("u1", CLIENT_ID) == {"p": after, "keep": "x"}


def test_a_missing_property_counts_from_zero_and_a_dot_path_is_nested(
    server: StandInServer,
) -> None:
    server.set_profile_flush(0)
    identify(server, "u1", {"stats": {"logins": 4}})
    assert counter(server, "u1", "stats.logins", 2)[0] == 200
    assert counter(server, "u1", "stats.new.deep")[0] == 200
    assert counter(server, "u1", "fresh", 2.5)[0] == 200
    assert server.profile("u1", CLIENT_ID) == {
        "stats": {"logins": 6, "new": {"deep": 1}},
        "fresh": 2.5,
    }


def test_identifies_merge_as_the_server_merges_them(server: StandInServer) -> None:
    server.set_profile_flush(0)
    identify(server, "u1", {"plan": "pro", "nested": {"a": 1}, "gone": "x"})
    identify(server, "u1", {"plan": "", "nested": {"b": 2}, "gone": None, "new": 1})
    # strip drops "" and null before the merge, so both old values stay.
    assert server.profile("u1", CLIENT_ID) == {
        "plan": "pro",
        "nested": {"a": 1, "b": 2},
        "gone": "x",
        "new": 1,
    }


def test_a_track_identifying_its_profile_writes_it(server: StandInServer) -> None:
    server.set_profile_flush(0)
    identity = {"profileId": "u9", "email": "a@b.co", "properties": {"tier": 2}}
    body = {"type": "track", "payload": {"name": "x", "properties": {"__identify": identity}}}
    assert post(server, body).status_code == 200
    assert server.profile("u9", CLIENT_ID) == {"tier": 2}


def test_assign_group_with_a_profile_id_writes_the_profile(server: StandInServer) -> None:
    server.set_profile_flush(0)
    body = {"type": "assign_group", "payload": {"groupIds": ["g"], "profileId": "u7"}}
    assert post(server, body).status_code == 200
    assert server.profile("u7", CLIENT_ID) == {}


def test_the_control_endpoints_set_the_interval_and_read_a_profile(server: StandInServer) -> None:
    control = StandInControl(server.url, timeout=TIMEOUT_S)
    control.set_profile_flush(0)
    identify(server, "u1", {"n": "3"})
    assert control.profile("u1", CLIENT_ID) == {"n": "3"}
    assert control.profile("nobody", CLIENT_ID) is None
    with pytest.raises(RuntimeError, match="seconds must be finite"):
        control.set_profile_flush(-1)


def test_reset_forgets_profiles_and_keeps_the_interval(server: StandInServer) -> None:
    server.set_profile_flush(0)
    identify(server, "u1", {})
    server.reset()
    assert server.profile("u1", CLIENT_ID) is None
    identify(server, "u1", {})
    assert server.profile("u1", CLIENT_ID) == {}


@pytest.mark.parametrize(
    ("value", "parsed"),
    [(5, 5), (-0.5, 0), (1e21, 1), (1.5e-7, 1), (2**70, 1), ("+3", 3), ("\u00a0\t9x", 9),
     ("0x10", 0), ("x1", None), ([], None), ([[1, 2], 3], 1), (float("nan"), None)],
)  # fmt: skip
def test_values_are_read_as_javascripts_parseint_of_their_string(
    value: object, parsed: int | None
) -> None:
    assert _parse_int(value) == parsed


def test_a_write_is_visible_after_its_own_interval_whatever_the_setting_is_later() -> None:
    store = ProfileStore()
    store.write(("c", "u"), {"a": 1}, now=0.0, flush_s=10.0)
    store.write(("c", "u"), {"b": 2}, now=1.0, flush_s=0.0)  # not before the earlier write
    assert store.visible(("c", "u"), 9.9) is None
    assert store.visible(("c", "u"), 10.0) == {"a": 1, "b": 2}
