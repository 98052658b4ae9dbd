"""Constants and helpers the stand-in's tests share (fixtures are in conftest.py)."""

from __future__ import annotations

import threading
import time
from typing import Any

import requests

from op_celery.testing import StandInServer

CLIENT_ID = "0b6f5e1c-2d3a-4b5c-8d9e-0f1a2b3c4d5e"
SECRET = "sec_stand-in-test"
OTHER_CLIENT_ID = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"
OTHER_SECRET = "sec_other"
AUTH = {"openpanel-client-id": CLIENT_ID, "openpanel-client-secret": SECRET}
OTHER_AUTH = {"openpanel-client-id": OTHER_CLIENT_ID, "openpanel-client-secret": OTHER_SECRET}
#: Every request in these tests gives up after this many seconds rather than hang the suite.
TIMEOUT_S = 5.0
TRACK = {"type": "track", "payload": {"name": "signup"}}
#: A browser's user agent: its events are not server events.
BROWSER = "Mozilla/5.0 (X11; Linux x86_64; rv:140.0) Gecko/20100101 Firefox/140.0"


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def post(
    server: StandInServer,
    body: Any,
    headers: dict[str, str] | None = None,
    session: requests.Session | None = None,
    **kwargs: Any,
) -> requests.Response:
    """POST ``body`` as JSON to the server's ``/track`` with ``AUTH`` unless ``headers``."""
    sender = session or requests
    return sender.post(
        f"{server.url}/track",
        json=body,
        headers=AUTH if headers is None else headers,
        timeout=kwargs.pop("timeout", TIMEOUT_S),
        **kwargs,
    )


def stand_in_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("op-celery-stand-in")]


def wait_until(condition: Any, timeout: float = TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


#: The rate-limit headers of ``@fastify/rate-limit``.
RATE_HEADERS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "retry-after")


def rate_headers(response: requests.Response) -> dict[str, str]:
    return {name: response.headers[name] for name in RATE_HEADERS if name in response.headers}
