"""The pytest plugin the package registers (entry point ``pytest11``): ``pip install op-celery``
is enough for a test to ask for the ``openpanel_events`` fixture.

Nothing is imported from op-celery until a test asks for the fixture, so the plugin costs
nothing in a suite that does not use it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from op_celery._capture import Recorder


@pytest.fixture
def openpanel_events() -> Iterator[Recorder]:
    """The events the test's code tracked, captured instead of published (empty at the start
    of every test): ``assert openpanel_events.names == ["signup"]``."""
    from op_celery._capture import capturing

    with capturing() as events:
        yield events
