"""A user's worker module that accepts only pickle, for ``tests/test_consumer.py``::

    celery -A tests.pickle_worker_app worker

The package's app, with ``accept_content=["pickle"]``: every event (JSON) is refused.
"""

from __future__ import annotations

from op_celery.worker import app

app.conf.accept_content = ["pickle"]

__all__ = ["app"]
