"""Framework integrations: each sets the end user's IP and user agent for the request it
handles, so every ``.delay()`` made while handling it forwards them to OpenPanel.

- ``op_celery.contrib.django``: ``OpenPanelMiddleware`` and ``delay_on_commit``
  (``pip install 'op-celery[django]'``)
- ``op_celery.contrib.flask``: the ``OpenPanel`` extension (``pip install 'op-celery[flask]'``)
- ``op_celery.contrib.fastapi``: ``OpenPanelMiddleware``, a pure ASGI middleware for Starlette
  and FastAPI (``pip install 'op-celery[fastapi]'``)

Each module imports its framework when it is imported itself; ``import op_celery`` and
``import op_celery.contrib`` need none of them. Behind a reverse proxy, tell the integration
which peers to believe about ``X-Forwarded-For`` (``trusted_proxies``): by default it believes
none and uses the address of the socket's peer.
"""
