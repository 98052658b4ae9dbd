"""The per-request lines (`_log`): what a line says, and a writer that never holds an answer."""

from __future__ import annotations

import io
import threading
import time

import pytest
import requests

from op_celery.testing import StandInServer
from op_celery.testing._log import MAX_FIELD_CHARS, RequestLog, format_line

from ._support import AUTH, CLIENT_ID, SECRET, TIMEOUT_S, TRACK, post, stand_in_threads

#: 2026-12-03 12:00:01.234 in this machine's local time.
AT = time.mktime((2026, 12, 3, 12, 0, 1, 0, 0, -1)) + 0.2345


def test_a_track_line_has_time_method_path_status_client_type_and_name() -> None:
    line = format_line(AT, "POST", "/track", 200, CLIENT_ID, "track", "signup")
    assert line == f'12:00:01.234 POST /track 200 client={CLIENT_ID} track "signup"'


def test_a_line_leaves_out_what_the_request_did_not_have() -> None:
    assert format_line(AT, "POST", "/track", 401, "", "identify", None) == (
        "12:00:01.234 POST /track 401 client=- identify"
    )
    assert format_line(AT, "POST", "/track", 400, "", "", None) == (
        "12:00:01.234 POST /track 400 client=- -"
    )
    assert format_line(AT, "GET", "/__stand-in/stats", 200, None, None, None) == (
        "12:00:01.234 GET /__stand-in/stats 200"
    )
    assert format_line(AT, "POST", "/track", "dropped", CLIENT_ID, "track", 5).endswith(
        "dropped client=0b6f5e1c-2d3a-4b5c-8d9e-0f1a2b3c4d5e track"
    )


def test_text_from_the_request_cannot_write_to_the_terminal_or_flood_the_line() -> None:
    line = format_line(AT, "POST", "/track", 200, "\x1b[31mred", "track", "a\nb\x9b" + "x" * 500)
    assert "\x1b" not in line and "\n" not in line and "\x9b" not in line
    assert "client=\\x1b[31mred" in line
    assert line.endswith('"a\\nb\\x9b' + "x" * (MAX_FIELD_CHARS - 5) + '…"')


class BlockingStream(io.StringIO):
    """A stream whose writes wait until the test lets them through."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.entered.set()
        self.release.wait(TIMEOUT_S)
        return super().write(text)


def test_lines_past_the_queue_are_dropped_and_counted_instead_of_waiting() -> None:
    stream = BlockingStream()
    log = RequestLog(stream, "op-celery-stand-in:test:log", max_waiting=2)
    log.note("one")
    assert stream.entered.wait(TIMEOUT_S)  # the writer holds "one" in a blocked write
    for line in ("two", "three", "four", "five"):
        log.note(line)  # returns at once: two wait, two are dropped
    stream.release.set()
    log.close(TIMEOUT_S)
    assert stream.getvalue().splitlines() == [
        "one",
        "two",
        "three",
        "(2 request lines dropped: the output was not read)",
    ]
    assert stand_in_threads() == []


def test_the_server_writes_one_line_per_request_and_never_the_secret() -> None:
    stream = io.StringIO()
    server = StandInServer({CLIENT_ID: SECRET}, request_log=stream).start()
    try:
        assert post(server, TRACK).status_code == 200
        wrong = {**AUTH, "openpanel-client-secret": "sec_wrong-secret"}
        assert post(server, {"type": "identify", "payload": {"profileId": 1}}, wrong).status_code
        server.drop_next(1)
        with pytest.raises(requests.ConnectionError):
            post(server, TRACK)
        requests.post(f"{server.url}/event", json=TRACK, headers=AUTH, timeout=TIMEOUT_S)
        requests.get(f"{server.url}/__stand-in/stats", timeout=TIMEOUT_S)
    finally:
        server.stop()
    lines = [line.split(" ", 1)[1] for line in stream.getvalue().splitlines()]
    # Each connection's thread logs its line after answering, so two requests in a row may log
    # in either order (a CI run saw it): the lines are compared as a multiset.
    assert sorted(lines) == sorted(
        [
            f'POST /track 200 client={CLIENT_ID} track "signup"',
            f"POST /track 401 client={CLIENT_ID} identify",
            f'POST /track dropped client={CLIENT_ID} track "signup"',
            f"POST /event 404 client={CLIENT_ID}",
            "GET /__stand-in/stats 200",
        ]
    )
    assert SECRET not in stream.getvalue() and "sec_wrong-secret" not in stream.getvalue()
    assert stand_in_threads() == []  # the writer thread ended with the server


def test_a_server_without_a_request_log_starts_no_writer_thread() -> None:
    with StandInServer({CLIENT_ID: SECRET}) as server:
        post(server, TRACK)
        assert not [t for t in stand_in_threads() if t.name.endswith(":log")]
