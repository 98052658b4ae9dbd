"""The stand-in as a whole (`_server`): its public names, lifecycle and shutdown."""

from __future__ import annotations

import socket
import threading

import pytest
import requests

import op_celery.testing
from op_celery.testing import StandInServer

from ._support import CLIENT_ID, SECRET, TIMEOUT_S, TRACK, post, stand_in_threads, wait_until

# --- Public API. -------------------------------------------------------------------------


def test_all_names_exactly_what_the_package_exports() -> None:
    # "@..." names: pytest's assert rewriting of the package that registers its plugin.
    public = {name for name in vars(op_celery.testing) if not name.startswith(("_", "@"))}
    assert (
        set(op_celery.testing.__all__)
        == public
        == {
            "CapturedEvent",
            "Received",
            "Recorder",
            "StandInControl",
            "StandInServer",
            "capture",
        }
    )


def test_url_is_an_http_loopback_address_with_the_bound_port(server: StandInServer) -> None:
    assert server.url.startswith("http://127.0.0.1:")
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S):
        pass


def test_add_client_refuses_an_id_the_real_server_would_never_accept() -> None:
    with pytest.raises(ValueError, match="UUID"):
        StandInServer({"not-a-uuid": "secret"})
    with pytest.raises(ValueError, match="UUID"):
        StandInServer({CLIENT_ID.upper(): "secret"})


def test_a_server_starts_only_once_and_has_no_url_when_stopped() -> None:
    server = StandInServer({CLIENT_ID: SECRET})
    with pytest.raises(RuntimeError):
        _ = server.url
    with server, pytest.raises(RuntimeError):
        server.start()
    with pytest.raises(RuntimeError):
        _ = server.url
    with pytest.raises(RuntimeError):
        server.start()
    server.stop()  # a second stop does nothing


# --- Shutdown. -----------------------------------------------------------------------------


def test_stop_closes_the_port_and_open_connections_and_leaves_no_threads() -> None:
    server = StandInServer({CLIENT_ID: SECRET}).start()
    port = int(server.url.rsplit(":", 1)[1])
    idle = requests.Session()
    assert post(server, TRACK, session=idle).status_code == 200  # an idle keep-alive connection
    server.set_latency(60)
    outcome: list[BaseException | requests.Response] = []

    def send_and_wait() -> None:
        try:
            outcome.append(post(server, TRACK))
        except requests.RequestException as exc:
            outcome.append(exc)

    sleeping = threading.Thread(target=send_and_wait)
    sleeping.start()
    assert wait_until(lambda: len(stand_in_threads()) >= 3)  # accept loop + two connections
    server.stop()
    sleeping.join(TIMEOUT_S)
    assert not sleeping.is_alive()
    assert isinstance(outcome[0], requests.ConnectionError)  # woken and cut off, not answered
    assert stand_in_threads() == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S).close()
    idle.close()
