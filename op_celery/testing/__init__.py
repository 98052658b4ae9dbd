"""Test support shipped to users: a stand-in OpenPanel server and a client for its controls.

```python
from op_celery.testing import StandInServer

with StandInServer(clients={CLIENT_ID: SECRET}) as server:
    ...  # point op-celery at server.url
    assert server.wait_for(1)
    assert server.received[0].payload["name"] == "signup"
```

Run one in its own process with ``python -m op_celery.testing --client ID:SECRET`` and drive it
with `StandInControl`. See `op_celery.testing._server` for what it models and what it does not.
"""

from op_celery.testing._control import StandInControl
from op_celery.testing._model import Received
from op_celery.testing._server import StandInServer

__all__ = ["Received", "StandInControl", "StandInServer"]
