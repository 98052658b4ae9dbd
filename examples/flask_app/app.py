"""A one-file Flask app whose views enqueue OpenPanel events with op-celery.

    pip install 'op-celery[flask]'
    flask --app examples/flask_app/app.py run             # http://127.0.0.1:5000/
    celery -A op_celery.worker worker                     # another shell: delivers the events

The views only need the broker (Redis on 127.0.0.1:6379, or ``OP_CELERY_BROKER_URL``); the
worker also needs ``OPENPANEL_CLIENT_ID`` and ``OPENPANEL_CLIENT_SECRET`` (see the README).
"""

from __future__ import annotations

from flask import Flask, request

import op_celery
from op_celery.contrib.flask import OpenPanel

app = Flask(__name__)
# Behind a reverse proxy, name it: ["10.0.0.0/8"], or a number of hops.
app.config["OPENPANEL_TRUSTED_PROXIES"] = None
OpenPanel(app)


@app.get("/")
def index() -> dict[str, list[str]]:
    # No client_ip / user_agent here: the extension supplies the visitor's.
    op_celery.track.delay("page_viewed", properties={"path": request.path})
    return {"enqueued": ["page_viewed"]}


@app.post("/login/<user_id>")
def login(user_id: str) -> dict[str, list[str]]:
    op_celery.identify.delay(user_id)
    op_celery.increment.delay(user_id, "logins")
    return {"enqueued": ["identify", "increment"]}
