"""Header values: what `.delay()` accepts, the client sends intact; what it refuses, it could not.

``user_agent``, ``client_ip`` and ``event_id`` become the ``user-agent``,
``openpanel-client-ip``/``x-client-ip`` and ``request-id`` headers. The rule (`_rules.
header_failure`) is what latin-1, RFC 9110, ``requests`` and Node's HTTP parser all take.
"""

from __future__ import annotations

import pytest
import requests

from op_celery import InvalidEvent, OpenPanelClient, build_event
from op_celery._events import normalize_call
from op_celery._rules import header_failure
from op_celery.testing import StandInServer

from ._support import CLIENT_ID, CLIENT_SECRET

SENDABLE_USER_AGENTS = [
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36",
    "curl/8.0 caf\xe9 \xfc\xff \x80",  # obs-text: latin-1 bytes above 0x7f
    "a\tb",  # HTAB inside a value is allowed
    "x" * 1024,
    "trailing space is stripped by the server ",
]
UNSENDABLE_USER_AGENTS = [
    "Mozilla/5.0 \U0001f600",
    "Mozilla/5.0 \u4e2d\u6587",
    "Mozilla/5.0 \ud800",
    " leading space",
    "\tleading tab",
    "\xa0leading no-break space",
    "a\r\nX-Evil: 1",
    "a\nb",
    "a\rb",
    "a\x00b",
    "a\x7fb",
    "a\x1fb",
]


@pytest.mark.parametrize("user_agent", SENDABLE_USER_AGENTS)
def test_an_accepted_user_agent_reaches_the_server_as_given(
    stand_in: StandInServer, user_agent: str
) -> None:
    client = OpenPanelClient(CLIENT_ID, CLIENT_SECRET, stand_in.url, read_timeout_s=5.0)
    message = normalize_call("track", ("x",), {"user_agent": user_agent})
    client.send(build_event("track", message))
    [received] = stand_in.received
    assert received.headers["user-agent"].rstrip() == user_agent.rstrip()


def test_an_accepted_scoped_ip_reaches_the_server_as_given(stand_in: StandInServer) -> None:
    client = OpenPanelClient(CLIENT_ID, CLIENT_SECRET, stand_in.url, read_timeout_s=5.0)
    event = build_event("track", {"name": "x", "client_ip": "fe80::1%eth0"})
    client.send(event)
    [received] = stand_in.received
    assert received.headers["openpanel-client-ip"] == "fe80::1%eth0"


@pytest.mark.parametrize("user_agent", UNSENDABLE_USER_AGENTS)
def test_a_refused_user_agent_is_refused_at_delay_with_the_reason(user_agent: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        normalize_call("track", ("x",), {"user_agent": user_agent})
    assert caught.value.field == "user_agent"
    assert "user-agent header" in str(caught.value)


@pytest.mark.parametrize(
    "value",
    [v for v in UNSENDABLE_USER_AGENTS if v.strip() and not any(c in v for c in "\x00\x7f\x1f")],
)
def test_requests_itself_cannot_send_what_is_refused(value: str) -> None:
    """Not stricter than the transport: requests or http.client fail on each of these (NUL,
    DEL and other controls pass requests but Node answers 400 Bad Request to them)."""
    with pytest.raises((requests.exceptions.InvalidHeader, UnicodeEncodeError, ValueError)):
        prepared = requests.Request("POST", "http://127.0.0.1:9/", headers={"x": value}).prepare()
        prepared.headers["x"].encode("latin-1")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("client_ip", "fe80::1%\U0001f600"),
        ("client_ip", "fe80::1%a\r\nb"),
        ("event_id", "abcdefgh\r\nX"),
        ("event_id", " abcdefgh"),
        ("event_id", "abcdefgh\x01"),
    ],
)
def test_other_header_values_are_checked_too(field: str, value: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        normalize_call("track", ("x",), {field: value})
    assert caught.value.field == field


def test_every_latin_1_character_is_classified() -> None:
    """Inside a value: HTAB, SP, VCHAR and obs-text pass; the other controls do not."""
    for code in range(256):
        char = chr(code)
        allowed = code == 9 or 0x20 <= code <= 0x7E or code >= 0x80
        assert (header_failure(f"a{char}b") is None) == allowed, hex(code)
