"""A user's worker module with Prometheus metrics, for ``tests/test_metrics.py``::

    celery -A tests.metrics_worker_app worker

The package's app, plus the two lines the metrics docs ask users to add (the port comes from
the test, through the environment).
"""

from __future__ import annotations

import os

import op_celery.metrics
from op_celery.worker import app

op_celery.metrics.install(start_http_server_port=int(os.environ["TEST_METRICS_PORT"]))

__all__ = ["app"]
