"""The package's own Celery app, for users who have none::

    celery -A op_celery.worker worker --pool threads --concurrency 32

It reads the settings from the environment (see the README), consumes the ``openpanel`` queue
(``OP_CELERY_QUEUE``) and delivers every event to the OpenPanel API.
"""

import os

from . import _tasks  # noqa: F401  (registers the tasks on every app, this one included)
from ._app import package_app

__all__ = ["app"]

app = package_app()

if os.environ.get("OP_CELERY_METRICS_PORT"):  # Prometheus metrics; needs op-celery[prometheus]
    from .metrics import install_from_env

    install_from_env()
