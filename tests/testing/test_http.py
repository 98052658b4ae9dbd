"""The HTTP plumbing (`_http`): framing, keep-alive, routes."""

from __future__ import annotations

import pytest
import requests

from op_celery.testing import StandInServer

from ._support import AUTH, TIMEOUT_S, TRACK, post


def test_a_body_over_one_mebibyte_gets_413(server: StandInServer) -> None:
    big = {"type": "track", "payload": {"name": "x", "properties": {"blob": "a" * 1_100_000}}}
    assert post(server, big).status_code == 413


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
