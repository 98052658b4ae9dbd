"""The builders accept what the server accepts and name the argument and rule otherwise."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta, timezone

import pytest

from op_celery import InvalidEvent, _checks, build_event
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
        ("increment", {"profile_id": "u", "property": ""}, "property"),
        ("increment", {"profile_id": "u", "property": "v", "value": 0}, "value"),
        ("increment", {"profile_id": "u", "property": "v", "value": -2}, "value"),
        ("increment", {"profile_id": "u", "property": "v", "value": "2"}, "value"),
        ("increment", {"profile_id": "u", "property": "v", "value": 10**400}, "value"),
        ("increment", {"profile_id": "u", "property": "v", "value": 2**60}, "value"),
        ("track", {"name": "x", "properties": {"n": 10**5000}}, "properties['n']"),
        ("track", {"name": "x", "properties": {"n": [2**53]}}, "properties['n'][0]"),
        ("track", {"name": "x", "profile_id": 10**5000}, "profile_id"),
        (
            "track",
            {"name": "x", "timestamp": datetime.min.replace(tzinfo=timezone(timedelta(hours=1)))},
            "timestamp",
        ),
        (
            "track",
            {"name": "x", "timestamp": datetime.max.replace(tzinfo=timezone(timedelta(hours=-1)))},
            "timestamp",
        ),
        ("track", {"name": "x", "timestamp": "0001-01-01T00:00:00+01:00"}, "timestamp"),
        ("track", {"name": "x", "project": "a\n"}, "project"),
        ("track", {"name": "x", "properties": {"__proto__": {}}}, "properties['__proto__']"),
        ("track", {"name": "😀" * 41}, "name"),
        ("track", {"name": "x WAITFOR DELAY y"}, "name"),
        ("track", {"name": "toast.message_shown"}, "name"),
        ("track", {"name": "x", "event_id": "abcdefgh\r\nX-Evil: 1"}, "event_id"),
        ("identify", {"profile_id": "u", "avatar": "http://[::1"}, "avatar"),
        ("identify", {"profile_id": "u", "avatar": "x.io/a.png"}, "avatar"),
        ("identify", {"profile_id": "u", "email": "josé@example.com"}, "email"),
        ("identify", {"profile_id": "u", "email": "a@[1.2.3.4]"}, "email"),
        ("identify", {"profile_id": "u", "email": "a..b@example.com"}, "email"),
        ("decrement", {"profile_id": "u", "property": "v", "value": None}, "value"),
        ("alias", {"profile_id": "u", "alias": ""}, "alias"),
        ("group", {"id": "g", "type": "", "name": "n"}, "type"),
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


def test_what_the_server_accepts_is_accepted() -> None:
    """The rows of issue 15 that op-celery used to refuse and OpenPanel accepts."""
    assert payload("track", name="😀" * 40)["name"] == "😀" * 40
    assert payload("track", name=" ", profile_id=" ")["profileId"] == " "
    assert payload("track", name="revenue", properties={"__revenue": 1.0})["properties"]
    assert payload("track", name="revenue")["name"] == "revenue"
    assert payload("track", name="x", groups=[" "])["groups"] == [" "]
    assert payload("group", id="g", type="t", name=" ")["name"] == " "
    assert payload("assign_group", group_ids=[], profile_id="u1")["groupIds"] == []
    assert payload("identify", profile_id="u1", first_name="", last_name="") == {
        "profileId": "u1", "firstName": "", "lastName": "",
    }  # fmt: skip
    for avatar in ("ftp://x/y", "mailto:a@b.c", "data:image/png;base64,iVBORw0KGgo=", "https:x.io"):
        assert payload("identify", profile_id="u1", avatar=avatar)["avatar"] == avatar
    for email in ("o'brien@example.com", "a+b@example.com", "a@b.co"):
        assert payload("identify", profile_id="u1", email=email)["email"] == email


def test_a_profile_id_beyond_2_53_is_sent_as_its_exact_decimal_string() -> None:
    assert payload("track", name="x", profile_id=2**60)["profileId"] == "1152921504606846976"
    assert payload("identify", profile_id=-(2**53))["profileId"] == "-9007199254740992"
    assert payload("identify", profile_id=2**53 - 1)["profileId"] == 2**53 - 1
    message = normalize_call("identify", (2**60,), {})
    assert message["profile_id"] == "1152921504606846976"


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"name": "😀" * 41}, "track: name is 82 UTF-16 code units; OpenPanel allows 80"),
        ({"name": "x WAITFOR DELAY y"}, "track: name contains 'waitfor delay', one of OpenPanel's"),
        ({"name": "interact.share"}, "track: name contains 'interact.sh'"),
        ({"name": "/x.php"}, "track: name matches OpenPanel's path-scan pattern"),
        ({"name": "session_end"}, "track: name is 'session_end', which OpenPanel reserves"),
        (
            {"name": "x", "properties": {"n": float("inf")}},
            "track: properties['n'] must be a finite",
        ),
        ({"name": "x", "properties": {1: "a"}}, "track: properties has the key 1 (int): op-celery"),
        (
            {"name": "x", "properties": {"n": 2**60}},
            "track: properties['n'] is 1152921504606846976, beyond 2**53 - 1",
        ),
        (
            {"name": "x", "user_agent": "Mozilla/5.0 😀"},
            "track: user_agent 'Mozilla/5.0 😀' holds '😀' (U+1F600)",
        ),
        ({"name": "x", "client_ip": "fe80::1%😀"}, "track: client_ip 'fe80::1%😀' holds '😀'"),
        (
            {"name": "x", "properties": {"a": "x" * 1_100_000}},
            "track: properties makes the event 1,100,",
        ),
    ],
)
def test_refusals_name_the_argument_the_rule_and_the_reason(
    kwargs: dict[str, object], expected: str
) -> None:
    with pytest.raises(InvalidEvent) as caught:
        build_event("track", kwargs)
    assert str(caught.value).startswith(expected)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("user_agent", "Mozilla/5.0 😀"),
        ("user_agent", "Mozilla/5.0 中文"),
        ("user_agent", "Mozilla/5.0 \ud800"),
        ("user_agent", " Mozilla/5.0"),
        ("user_agent", "\xa0Mozilla/5.0"),
        ("user_agent", "Mozilla/5.0\r\nX-Evil: 1"),
        ("user_agent", "Mozilla\n/5.0"),
        ("user_agent", "Mozilla\x00/5.0"),
        ("user_agent", "Mozilla\x7f/5.0"),
        ("client_ip", "fe80::1%😀"),
        ("client_ip", "fe80::1%a\r\nb"),
        ("event_id", "abcdefgh\r\nX"),
        ("event_id", " abcdefgh"),
        ("event_id", "abcdefgh\x01"),
    ],
)
def test_values_that_cannot_be_http_headers_are_invalid_events(field: str, value: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        normalize_call("track", ("x",), {field: value})
    assert caught.value.field == field


def test_header_values_latin_1_allows_are_accepted_as_requests_sends_them() -> None:
    for user_agent in ("Mozilla/5.0 (X11; Linux) é\tü", "a", "x" * 1024, "curl/8.0 \x80\xff"):
        assert (
            build_event("track", {"name": "x", "user_agent": user_agent}).user_agent == user_agent
        )
    assert (
        build_event("track", {"name": "x", "client_ip": "fe80::1%eth0"}).client_ip == "fe80::1%eth0"
    )
    assert build_event("track", {"name": "x", "client_ip": "::ffff:1.2.3.4"}).client_ip == "1.2.3.4"


def test_an_event_over_one_mib_is_refused_and_one_just_under_is_not() -> None:
    from op_celery._events import MAX_BODY_BYTES

    base = len(
        json.dumps(
            build_event("track", {"name": "x", "properties": {"a": ""}}).body, separators=(",", ":")
        )
    )
    fits = {"a": "x" * (MAX_BODY_BYTES - base)}
    event = build_event("track", {"name": "x", "properties": fits})
    assert len(json.dumps(event.body, separators=(",", ":"))) == MAX_BODY_BYTES
    with pytest.raises(InvalidEvent, match="properties makes the event 1,048,577 bytes"):
        build_event("track", {"name": "x", "properties": {"a": "x" * (MAX_BODY_BYTES - base + 1)}})
    with pytest.raises(InvalidEvent) as caught:
        normalize_call("track", ("x",), {"properties": {"blob": "x" * 10_000_000}})
    assert caught.value.field == "properties"
    assert len(str(caught.value)) < 300


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


def test_the_size_bound_is_never_below_the_encoded_size() -> None:
    """The check skips encoding when the bound fits, so the bound must hold for any JSON."""
    import random
    from pathlib import Path

    from op_celery._checks import json_bound

    table = json.loads((Path(__file__).parent / "data" / "openpanel_verdicts.json").read_text())
    bodies = [json.loads(case["body"]) for case in table["cases"]]
    rng = random.Random(7)
    scalars = [
        "", "\U0001f600" * 3, "\x00\"\\\n", "\ud800", "é中", 2**53 - 1, -(2**53 - 1), 0,
        -1.2345678901234567e-308, 1e300, 5e-324, True, False, None,
    ]  # fmt: skip

    def value(depth: int) -> object:
        roll = rng.random()
        if depth > 3 or roll < 0.5:
            return rng.choice(scalars)
        if roll < 0.75:
            return [value(depth + 1) for _ in range(rng.randint(0, 4))]
        return {rng.choice(["", "k", "\U0001f600", "é"]) * rng.randint(0, 3): value(depth + 1)
                for _ in range(rng.randint(0, 4))}  # fmt: skip

    bodies += [value(0) for _ in range(2000)]
    for body in bodies:
        assert json_bound(body) >= len(json.dumps(body, separators=(",", ":"))), body


# -- revenue and device_id, as OpenPanel's SDKs send them --


def test_revenue_is_a_revenue_track_event_carrying_the_amount_as_revenue_property() -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    event = build_event(
        "revenue",
        {"amount": 1299, "properties": {"currency": "USD"}, "profile_id": "u1",
         "timestamp": moment, "device_id": "cookie-abc"},
    )  # fmt: skip
    assert event.operation == "revenue"
    assert event.body == {
        "type": "track",
        "payload": {
            "name": "revenue",
            "properties": {
                "currency": "USD",
                "__revenue": 1299,
                "__deviceId": "cookie-abc",
                "__timestamp": "2026-01-02T03:04:05.000Z",
            },
            "profileId": "u1",
        },
    }


@pytest.mark.parametrize(
    ("amount", "accepted"),
    [(0, True), (1299, True), (1200.0, True), (2**53 - 1, True), (12.99, False), (-5, False),
     ("1299", False), (True, False), (None, False), (float("nan"), False), (2**53, False)],
)  # fmt: skip
def test_revenue_takes_the_amounts_the_server_takes_and_names_amount_otherwise(
    amount: object, accepted: bool
) -> None:
    if accepted:
        sent = build_event("revenue", {"amount": amount}).body["payload"]["properties"]
        assert sent["__revenue"] == amount and type(sent["__revenue"]) is int
        return
    with pytest.raises(InvalidEvent) as info:
        build_event("revenue", {"amount": amount})
    assert info.value.field == "amount"


def test_a_revenue_in_dollars_is_refused_with_the_minor_units_it_should_be() -> None:
    with pytest.raises(InvalidEvent, match=r"revenue: amount is 12\.99; .*1299"):
        normalize_call("revenue", (12.99,), {})


def test_revenue_refuses_the_amount_twice_and_a_missing_amount() -> None:
    with pytest.raises(InvalidEvent, match="pass it as amount"):
        normalize_call("revenue", (5,), {"properties": {"__revenue": 5}})
    with pytest.raises(InvalidEvent, match="amount is required"):
        normalize_call("revenue", (), {"properties": {}})


def test_a_revenue_message_rebuilds_the_same_body_on_the_worker() -> None:
    message = normalize_call(
        "revenue", (1200.0, {"plan": "pro"}), {"device_id": "d1", "groups": ("acme",)}
    )
    assert message["amount"] == 1200 and message["properties"] == {"plan": "pro"}
    assert json.loads(json.dumps(message)) == message
    first = build_event("revenue", message)
    assert build_event("revenue", json.loads(json.dumps(message))).body == first.body
    assert first.body["payload"]["groups"] == ["acme"]


def test_track_sends_device_id_as_the_device_id_property() -> None:
    got = payload("track", name="signup", properties={"plan": "pro"}, device_id="cookie-abc")
    assert got["properties"] == {
        "plan": "pro",
        "__deviceId": "cookie-abc",
        "__timestamp": got["properties"]["__timestamp"],  # type: ignore[index]
    }
    message = normalize_call("track", ("signup",), {"properties": {}, "device_id": "cookie-abc"})
    assert message["properties"] == {} and message["device_id"] == "cookie-abc"
    assert build_event("track", message).body["payload"]["properties"]["__deviceId"] == (
        "cookie-abc"
    )


@pytest.mark.parametrize(
    ("device_id", "accepted"),
    [("x" * 64, True), ("  " + "x" * 64 + " ", True), ("😀" * 32, True), ("x" * 65, False),
     ("😀" * 33, False), ("", False), ("   ", False), (123, False)],
)  # fmt: skip
def test_device_id_takes_what_the_server_keeps_and_refuses_what_it_would_ignore(
    device_id: object, accepted: bool
) -> None:
    # The server keeps properties.__deviceId when it is a string of 1 to 64 UTF-16 code units
    # once trimmed (sanitizeOverrideDeviceId) and silently ignores any other.
    if accepted:
        assert payload("track", name="x", device_id=device_id)["properties"]["__deviceId"] == (  # type: ignore[index]
            device_id
        )
        return
    with pytest.raises(InvalidEvent) as info:
        build_event("track", {"name": "x", "device_id": device_id})
    assert info.value.field == "device_id"


def test_device_id_given_twice_is_refused() -> None:
    with pytest.raises(InvalidEvent, match="pass the device id once"):
        normalize_call("track", ("x", {"__deviceId": "a"}), {"device_id": "b"})


def test_a_device_id_in_properties_alone_is_sent_as_it_is() -> None:
    got = payload("track", name="x", properties={"__deviceId": "a"})
    assert got["properties"]["__deviceId"] == "a"  # type: ignore[index]


# -- dedup_for: how long the ledger remembers an event the caller names --


@pytest.mark.parametrize(
    ("given", "seconds"),
    [(None, None), (86_400, 86_400), (0.5, 1), (timedelta(days=30), 2_592_000),
     (400 * 86_400, 400 * 86_400)],
)  # fmt: skip
def test_dedup_for_travels_in_the_message_as_whole_seconds(
    given: object, seconds: int | None
) -> None:
    message = normalize_call("track", ("x",), {"event_id": "stripe:evt_1", "dedup_for": given})
    assert message.get("dedup_for") == seconds
    assert build_event("track", message).dedup_for_s == seconds


@pytest.mark.parametrize(
    "given", [0, -1, 400 * 86_400 + 1, float("nan"), float("inf"), "30d", True, timedelta(0)]
)
def test_dedup_for_outside_its_bounds_is_refused_at_delay(given: object) -> None:
    with pytest.raises(InvalidEvent) as info:
        normalize_call("identify", ("u1",), {"dedup_for": given})
    assert info.value.field == "dedup_for"


# A client IP the server skips (private, loopback): warned once per process, still sent.


@pytest.fixture
def fresh_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_checks, "_warned_skipped_ip", False)


@pytest.mark.parametrize(
    ("ip", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.20.0.4", "private"),
        ("192.168.1.10", "private"),
        ("fd00::7", "private"),
        ("169.254.1.1", "link-local"),
        ("::ffff:192.168.0.1", "private"),
    ],
)
def test_a_client_ip_the_server_skips_is_warned_of_by_kind_and_still_sent(
    fresh_warning: None, caplog: pytest.LogCaptureFixture, ip: str, kind: str
) -> None:
    with caplog.at_level(logging.WARNING, logger="op_celery"):
        message = normalize_call("track", ("x",), {"client_ip": ip})
    assert message["client_ip"] in (ip, ip.removeprefix("::ffff:"))
    [record] = caplog.records
    text = record.getMessage()
    assert f"a {kind} address" in text and "ignores" in text
    assert "X-Forwarded-For" in text and "client_ip=" in text


def test_the_skipped_ip_warning_is_said_once_per_process(
    fresh_warning: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="op_celery"):
        for ip in ("10.0.0.1", "10.0.0.2", "127.0.0.1"):
            normalize_call("identify", ("u1",), {"client_ip": ip})
    assert len(caplog.records) == 1


@pytest.mark.parametrize("ip", ["203.0.113.7", "2001:db8::1", "172.32.0.1", "100.64.0.1"])
def test_a_public_client_ip_is_not_warned_of(
    fresh_warning: None, caplog: pytest.LogCaptureFixture, ip: str
) -> None:
    with caplog.at_level(logging.WARNING, logger="op_celery"):
        normalize_call("track", ("x",), {"client_ip": ip})
    assert caplog.records == []


def test_device_id_and_dedup_for_travel_only_when_given_so_older_workers_take_the_message() -> None:
    # A worker of the version before them refuses a message with an argument it does not know.
    assert not {"device_id", "dedup_for"} & normalize_call("track", ("x",), {}).keys()
    assert "dedup_for" not in normalize_call("revenue", (5,), {})
    message = normalize_call("track", ("x",), {"device_id": "d", "dedup_for": 60})
    assert (message["device_id"], message["dedup_for"]) == ("d", 60)
    assert build_event("track", normalize_call("track", ("x",), {})).dedup_for_s is None
