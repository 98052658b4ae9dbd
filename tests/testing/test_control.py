"""The control endpoints and `StandInControl` (`_control`)."""

from __future__ import annotations

import pytest
import requests

from op_celery.testing import StandInControl, StandInServer
from op_celery.testing._control import CONTROL_ENDPOINTS

from ._support import TIMEOUT_S, TRACK, FakeClock, post, rate_headers

# --- The control endpoints and StandInControl. -----------------------------------------------


def test_control_endpoints_over_raw_http(server: StandInServer) -> None:
    base = f"{server.url}/__stand-in"
    assert requests.post(f"{base}/fail", json={"count": 1, "status": 500}, timeout=TIMEOUT_S).ok
    assert post(server, TRACK).status_code == 500
    post(server, TRACK)
    received = requests.get(f"{base}/received", timeout=TIMEOUT_S).json()
    assert [(r["type"], r["payload"], r["status"]) for r in received] == [
        ("track", {"name": "signup"}, 200)
    ]
    assert requests.get(f"{base}/counts", timeout=TIMEOUT_S).json() == {"200": 1, "500": 1}
    assert requests.post(f"{base}/rate-limit", json={"limit": 1, "window": 10}, timeout=5).ok
    assert post(server, TRACK).status_code == 200
    assert post(server, TRACK).status_code == 429
    assert requests.post(f"{base}/reset", timeout=TIMEOUT_S).ok
    assert requests.get(f"{base}/counts", timeout=TIMEOUT_S).json() == {}


def test_control_fail_with_seconds_starts_an_outage(server: StandInServer) -> None:
    response = requests.post(
        f"{server.url}/__stand-in/fail", json={"seconds": 60, "status": 504}, timeout=TIMEOUT_S
    )
    assert response.ok
    assert [post(server, TRACK).status_code for _ in range(2)] == [504, 504]


def test_control_endpoints_refuse_unknown_names_and_bad_bodies(server: StandInServer) -> None:
    base = f"{server.url}/__stand-in"
    assert requests.get(f"{base}/nothing", timeout=TIMEOUT_S).status_code == 404
    assert requests.post(f"{base}/fail", data=b"{", timeout=TIMEOUT_S).status_code == 400
    assert requests.post(f"{base}/fail", json={"status": 500}, timeout=TIMEOUT_S).status_code == 400
    wrong_body = {"count": 1, "body": 5}
    assert requests.post(f"{base}/fail", json=wrong_body, timeout=TIMEOUT_S).status_code == 400
    bad_limit = requests.post(f"{base}/rate-limit", json={"limit": 0, "window": 1}, timeout=5)
    assert bad_limit.status_code == 400
    bad_mode = {"limit": 1, "window": 1, "headers": "some"}
    bad_headers = requests.post(f"{base}/rate-limit", json=bad_mode, timeout=TIMEOUT_S)
    assert bad_headers.status_code == 400
    assert "retry-after" in bad_headers.json()["error"]
    back = requests.post(f"{base}/advance", json={"seconds": -1}, timeout=TIMEOUT_S)
    assert back.status_code == 400


def test_stand_in_control_drives_and_reads_the_server(
    server: StandInServer, clock: FakeClock
) -> None:
    control = StandInControl(server.url + "/", timeout=TIMEOUT_S)
    control.fail_next(1, status=502)
    control.drop_next(1)
    assert post(server, TRACK).status_code == 502
    with pytest.raises(requests.ConnectionError):
        post(server, TRACK)
    assert post(server, TRACK).status_code == 200
    assert control.counts() == {502: 1, 200: 1}
    assert [r.status for r in control.requests()] == [502, 200]
    [received] = control.received()
    assert received == server.received[0]
    assert control.stats()["dropped"] == 1
    assert control.wait_for(1, timeout=TIMEOUT_S)
    assert control.wait_for(2, timeout=0.05) is False

    control.fail_for(10, status=500)
    assert post(server, TRACK).status_code == 500
    clock.advance(10)
    control.set_rate_limit(1, 10)
    assert [post(server, TRACK).status_code for _ in range(2)] == [200, 429]
    control.set_rate_limit(1, 10, headers="none")
    assert [rate_headers(post(server, TRACK)) for _ in range(2)] == [{}, {}]
    control.advance(10)
    control.set_rate_limit(1, 10, headers="retry-after")
    post(server, TRACK)
    control.advance(6)
    assert rate_headers(post(server, TRACK)) == {"retry-after": "4"}
    control.set_rate_limit(None)
    control.set_latency(0.01)
    new_id = "12345678-1234-4234-8234-123456789abc"
    control.add_client(new_id, "new-secret")
    headers = {"openpanel-client-id": new_id, "openpanel-client-secret": "new-secret"}
    assert post(server, TRACK, headers=headers).status_code == 200
    control.reset()
    assert control.requests() == []


def test_stand_in_control_raises_with_the_servers_reason(server: StandInServer) -> None:
    with pytest.raises(RuntimeError, match="UUID"):
        StandInControl(server.url, timeout=TIMEOUT_S).add_client("nope", "s")


def test_every_listed_control_endpoint_is_served(server: StandInServer) -> None:
    for method, name, _, _ in CONTROL_ENDPOINTS:
        response = requests.request(
            method, f"{server.url}/__stand-in/{name}", json={}, timeout=TIMEOUT_S
        )
        assert response.status_code in (200, 400), (method, name)  # 400: the body lacks fields
    unknown = requests.post(f"{server.url}/__stand-in/nothing", json={}, timeout=TIMEOUT_S)
    assert unknown.status_code == 404
