"""``python -m op_celery.cli``: the ``op-celery`` command."""

from op_celery.cli import main

main()
