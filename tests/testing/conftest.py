"""Fixtures of the stand-in's tests: a fake clock and a running server on it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from op_celery.testing import StandInServer

from ._support import CLIENT_ID, OTHER_CLIENT_ID, OTHER_SECRET, SECRET, FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def server(clock: FakeClock) -> Iterator[StandInServer]:
    with StandInServer({CLIENT_ID: SECRET, OTHER_CLIENT_ID: OTHER_SECRET}, clock=clock) as server:
        yield server
