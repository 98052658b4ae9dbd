"""A one-file FastAPI app whose endpoints enqueue OpenPanel events with op-celery.

    pip install 'op-celery[fastapi]' fastapi uvicorn
    uvicorn --app-dir examples/fastapi_app app:app        # http://127.0.0.1:8000/
    celery -A op_celery.worker worker                     # another shell: delivers the events

The endpoints only need the broker (Redis on 127.0.0.1:6379, or ``OP_CELERY_BROKER_URL``); the
worker also needs ``OPENPANEL_CLIENT_ID`` and ``OPENPANEL_CLIENT_SECRET`` (see the README).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

import op_celery
from op_celery.contrib.fastapi import OpenPanelMiddleware

app = FastAPI()
# Behind a reverse proxy, name it: trusted_proxies=["10.0.0.0/8"], or a number of hops.
app.add_middleware(OpenPanelMiddleware)


@app.get("/")
def index(request: Request) -> dict[str, list[str]]:
    # A ``def`` endpoint runs in the thread pool, so the publish never holds the event loop.
    # No client_ip / user_agent here: the middleware supplies the visitor's.
    op_celery.track.delay("page_viewed", properties={"path": request.url.path})
    return {"enqueued": ["page_viewed"]}


@app.post("/login/{user_id}")
async def login(user_id: str) -> dict[str, list[str]]:
    # In an ``async def`` endpoint, hand the (blocking) publish to the thread pool.
    await run_in_threadpool(op_celery.identify.delay, user_id)
    await run_in_threadpool(op_celery.increment.delay, user_id, "logins")
    return {"enqueued": ["identify", "increment"]}
