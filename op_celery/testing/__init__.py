"""Test support shipped to users: a stand-in OpenPanel server and a client for its controls.

```python
from op_celery.testing import StandInServer

with StandInServer(clients={CLIENT_ID: SECRET}) as server:
    ...  # point op-celery at server.url
    assert server.wait_for(1)
    assert server.received[0].payload["name"] == "signup"
```

To assert on what your own code tracked, with no broker, worker or network, capture instead:

```python
from op_celery.testing import capture

with capture() as events:
    signup_view(request)            # calls op_celery.track.delay("signup", ...)
assert events.names == ["signup"]   # validated as in production, published nowhere
```

In pytest, the ``openpanel_events`` fixture (registered by the package) is such a recorder.

Run one in its own process with ``python -m op_celery.testing --client ID:SECRET`` and drive it
with `StandInControl`. See `op_celery.testing._server` for what it models and what it does not.
"""

from op_celery._capture import CapturedEvent, Recorder
from op_celery._capture import capturing as capture
from op_celery.testing._control import StandInControl
from op_celery.testing._model import Received
from op_celery.testing._server import StandInServer

__all__ = [
    "CapturedEvent",
    "Received",
    "Recorder",
    "StandInControl",
    "StandInServer",
    "capture",
]
