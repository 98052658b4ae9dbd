"""The builders accept what the server accepts and name the argument and rule otherwise."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from op_celery import InvalidEvent, build_event
from op_celery._events import normalize_call


def payload(operation: str, **kwargs: object) -> dict[str, object]:
    body = build_event(operation, kwargs).body
    assert body["type"] == operation
    result: dict[str, object] = body["payload"]
    return result


def test_track_maps_snake_case_to_the_api_and_stamps_the_time() -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, 600000, tzinfo=timezone(timedelta(hours=2)))
    got = payload(
        "track", name="signup", properties={"plan": "pro"}, profile_id="u1",
        groups=["g1"], timestamp=moment,
    )  # fmt: skip
    assert got == {
        "name": "signup",
        "properties": {"plan": "pro", "__timestamp": "2026-01-02T01:04:05.600Z"},
        "profileId": "u1",
        "groups": ["g1"],
    }


def test_optional_fields_left_out_are_omitted_never_sent_as_null() -> None:
    assert "profileId" not in payload("track", name="x")
    assert payload("identify", profile_id=7) == {"profileId": 7}
    assert payload("increment", profile_id="u", property="visits") == {
        "profileId": "u",
        "property": "visits",
        "value": 1,
    }


def test_every_operation_builds_its_api_payload() -> None:
    assert payload("alias", profile_id="u", alias="a") == {"profileId": "u", "alias": "a"}
    assert payload("decrement", profile_id="u", property="credits", value=2.5)["value"] == 2.5
    assert payload("group", id="g", type="company", name="Acme", properties={"n": 1}) == {
        "id": "g",
        "type": "company",
        "name": "Acme",
        "properties": {"n": 1},
    }
    assert payload("assign_group", group_ids=["a", "b"], profile_id="u") == {
        "groupIds": ["a", "b"],
        "profileId": "u",
    }
    assert payload(
        "identify", profile_id="u", first_name="Ada", last_name="L", email="ada@example.com",
        avatar="https://example.com/a.png", properties={"k": [1, 2]},
    ) == {
        "profileId": "u", "firstName": "Ada", "lastName": "L", "email": "ada@example.com",
        "avatar": "https://example.com/a.png", "properties": {"k": [1, 2]},
    }  # fmt: skip


@pytest.mark.parametrize(
    ("operation", "kwargs", "field"),
    [
        ("track", {"name": ""}, "name"),
        ("track", {"name": "x" * 81}, "name"),
        ("track", {"name": "a\nb"}, "name"),
        ("track", {"name": "session_start"}, "name"),
        ("track", {"name": "../../etc/passwd"}, "name"),
        ("track", {"name": "/wp-login.php"}, "name"),
        ("track", {"name": "/.env"}, "name"),
        ("track", {"name": "${jndi:x}"}, "name"),
        ("track", {"name": "revenue", "properties": {"__revenue": -1}}, "properties['__revenue']"),
        ("track", {"name": "revenue", "properties": {"__revenue": 1.5}}, "properties['__revenue']"),
        ("track", {"name": "revenue"}, "properties['__revenue']"),
        ("track", {"name": "x", "properties": {"when": datetime.now()}}, "properties['when']"),
        ("track", {"name": "x", "properties": {"n": float("nan")}}, "properties['n']"),
        ("track", {"name": "x", "properties": {1: "a"}}, "properties"),
        ("track", {"name": "x", "properties": ["a"]}, "properties"),
        ("track", {"name": "x", "groups": "g1"}, "groups"),
        ("track", {"name": "x", "groups": [""]}, "groups[0]"),
        ("track", {"name": "x", "profile_id": ""}, "profile_id"),
        ("track", {"name": "x", "profile_id": True}, "profile_id"),
        ("track", {"name": "x", "timestamp": datetime(2026, 1, 1)}, "timestamp"),
        ("track", {"name": "x", "timestamp": "yesterday"}, "timestamp"),
        ("track", {"name": "x", "client_ip": "1.2.3"}, "client_ip"),
        ("track", {"name": "x", "user_agent": "a\r\nX-Evil: 1"}, "user_agent"),
        ("track", {"name": "x", "project": "no spaces"}, "project"),
        ("track", {"name": "x", "project": None}, "project"),
        ("identify", {"profile_id": None}, "profile_id"),
        ("identify", {"profile_id": "u", "email": "not-an-email"}, "email"),
        ("identify", {"profile_id": "u", "avatar": "ftp://x/y"}, "avatar"),
        ("identify", {"profile_id": "u", "first_name": ""}, "first_name"),
        ("increment", {"profile_id": "u", "property": ""}, "property"),
        ("increment", {"profile_id": "u", "property": "v", "value": 0}, "value"),
        ("increment", {"profile_id": "u", "property": "v", "value": -2}, "value"),
        ("increment", {"profile_id": "u", "property": "v", "value": "2"}, "value"),
        ("decrement", {"profile_id": "u", "property": "v", "value": None}, "value"),
        ("alias", {"profile_id": "u", "alias": ""}, "alias"),
        ("group", {"id": "g", "type": "", "name": "n"}, "type"),
        ("assign_group", {"group_ids": []}, "group_ids"),
        ("assign_group", {"group_ids": ["a", 3]}, "group_ids[1]"),
    ],
)
def test_invalid_input_raises_invalid_event_naming_the_argument(
    operation: str, kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidEvent) as caught:
        build_event(operation, kwargs)
    assert caught.value.field == field
    assert isinstance(caught.value, ValueError)
    assert str(caught.value).startswith(f"{operation}: {field} ")


def test_names_that_only_look_like_files_are_accepted_as_the_server_does() -> None:
    for name in ("view.php", "download report.pdf", "a/.env-like", "cart: 3 items"):
        assert payload("track", name=name)["name"] == name


def test_missing_and_unknown_arguments_are_invalid_events() -> None:
    with pytest.raises(InvalidEvent, match="name is required"):
        normalize_call("track", (), {})
    with pytest.raises(InvalidEvent, match="'nme' is not an argument"):
        normalize_call("track", (), {"nme": "x"})
    with pytest.raises(InvalidEvent, match="both by position and by keyword"):
        normalize_call("track", ("a",), {"name": "b"})


def test_normalized_call_is_plain_json_with_an_event_id_and_the_call_time() -> None:
    before = datetime.now(timezone.utc)
    message = normalize_call("track", ("signup",), {"properties": {"t": (1, 2)}})
    assert json.loads(json.dumps(message)) == message
    assert message["properties"] == {"t": [1, 2]}
    assert len(message["event_id"]) == 32
    stamped = datetime.fromisoformat(message["timestamp"].replace("Z", "+00:00"))
    assert before - timedelta(seconds=1) <= stamped <= datetime.now(timezone.utc)


def test_building_the_normalized_message_again_gives_the_same_body() -> None:
    message = normalize_call("track", ("signup",), {"profile_id": "u1", "client_ip": " ::1 "})
    again = normalize_call("track", (), message)
    assert again == message
    assert build_event("track", message).body == build_event("track", again).body
    assert build_event("track", message).client_ip == "::1"
