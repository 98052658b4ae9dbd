"""Every request has a total deadline: a server that drips its answer cannot hold a worker
(or outlive the event's ledger claim), whatever the per-read timeout allows."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from op_celery import NetworkError, OpenPanelClient, build_event
from op_celery._deadline import arm
from op_celery.testing import StandInServer

from ._support import CLIENT_ID, CLIENT_SECRET


@pytest.fixture
def dripping_server() -> Iterator[str]:
    """Answers every request with a status line, then headers a byte every 0.1 s, never
    finishing."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    stop = threading.Event()

    def drip(connection: socket.socket) -> None:
        with connection:
            connection.recv(65536)
            # The status line at once, then a header a byte at a time: cut off there, what was
            # read looks like a whole 200 to http.client, and must not count as one.
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
            answer = b"X-Drip: " + b"x" * 10_000
            for byte in answer:
                if stop.is_set():
                    return
                try:
                    connection.sendall(bytes([byte]))
                except OSError:
                    return
                time.sleep(0.1)

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=drip, args=(connection,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    listener.close()


def test_a_dripping_answer_ends_at_the_deadline_as_a_possible_duplicate(
    dripping_server: str,
) -> None:
    # Each byte comes well within the 0.5 s read timeout; only the deadline (1 s) ends it.
    client = OpenPanelClient(
        CLIENT_ID, CLIENT_SECRET, dripping_server, connect_timeout_s=0.5, read_timeout_s=0.5
    )
    with pytest.raises(NetworkError, match="deadline") as caught:
        client.send(build_event("track", {"name": "x"}))
    assert caught.value.maybe_delivered is True
    assert "may deliver it twice" in str(caught.value)


def test_a_refused_connection_is_not_a_possible_duplicate() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = OpenPanelClient(CLIENT_ID, CLIENT_SECRET, f"http://127.0.0.1:{port}")
    with pytest.raises(NetworkError) as caught:
        client.send(build_event("track", {"name": "x"}))
    assert caught.value.maybe_delivered is False


def test_the_next_request_after_a_deadline_goes_through_on_a_new_connection(
    stand_in: StandInServer,
) -> None:
    client = OpenPanelClient(
        CLIENT_ID, CLIENT_SECRET, stand_in.url, connect_timeout_s=0.3, read_timeout_s=0.4
    )
    stand_in.set_latency(5)
    with pytest.raises(NetworkError):
        client.send(build_event("track", {"name": "slow"}))
    stand_in.set_latency(0)
    assert client.send(build_event("track", {"name": "fast"})).status == 200
    for _ in range(3):  # many requests, each disarming its deadline, none cut off later
        assert client.send(build_event("track", {"name": "again"})).status == 200


def test_a_disarmed_deadline_never_fires() -> None:
    class Connection:
        def __init__(self) -> None:
            self.sock = socket.socket()

    connection = Connection()
    deadline = arm(0.01)
    deadline.bind(connection)
    deadline.disarm()
    time.sleep(0.6)  # two watchdog ticks
    assert deadline.expired is False
    connection.sock.close()
