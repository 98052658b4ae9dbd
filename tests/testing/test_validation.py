"""OpenPanel's body rules (`_validation`): fastify's parsing and the zod schemas, over HTTP."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests

from op_celery.testing import StandInServer

from ._support import AUTH, TIMEOUT_S, TRACK, post


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
    content = response.json()
    assert (content["status"], content["error"]) == (400, "Error")
    # zod's own words after the field, as the real server answers (tests/data has them all).
    assert content["message"].startswith(path)


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
    message = response.json()["message"]
    assert message.startswith("body/payload/profileId ")
    assert ", body/payload/property " in message


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
    assert response.json()["message"].startswith("body/ Invalid input: expected object")


def test_a_body_of_another_media_type_gets_415(server: StandInServer) -> None:
    response = requests.post(
        f"{server.url}/track",
        data=b"type=track",
        headers={**AUTH, "content-type": "application/x-www-form-urlencoded"},
        timeout=TIMEOUT_S,
    )
    assert response.status_code == 415
