"""What the stand-in answers (`_answers`): the 200 body with placeholder ids."""

from __future__ import annotations

from op_celery.testing import StandInServer

from ._support import TRACK, post

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
