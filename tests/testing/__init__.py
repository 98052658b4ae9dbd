"""Tests of the stand-in OpenPanel server, `op_celery.testing`, one file per module."""
