"""Fixtures of the ``op-celery`` command's tests: the workers' environment as the CLI reads it
(the shared Redis under private prefixes and queue, the stand-in server)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import _state

from op_celery import _app
from op_celery._settings import load_settings
from op_celery.dead_letters import DeadLetterStore


@pytest.fixture
def cli_env(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[dict[str, str]]:
    """The workers' environment, as the CLI reads it, and a package app built afresh from it."""
    for name in list(os.environ):
        if name.startswith(("OPENPANEL_", "OP_CELERY_", "CELERY_")) or name == "REDIS_URL":
            monkeypatch.delenv(name)
    values = {k: v for k, v in env.items() if k.startswith(("OPENPANEL_", "OP_CELERY_"))}
    values["OP_CELERY_SPOOL_DIR"] = str(tmp_path / "spool")
    values["OP_CELERY_PUBLISH_TIMEOUT"] = "0.3"
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(_app, "_package_app", None)
    monkeypatch.setattr(_state._tls, "current_app", None)
    _app.reset_settings()
    yield values
    if _app._package_app is not None:
        _app._package_app.close()
    _app.reset_settings()


@pytest.fixture
def store(cli_env: dict[str, str]) -> DeadLetterStore:
    return DeadLetterStore(load_settings())


@pytest.fixture
def queue_key(cli_env: dict[str, str]) -> str:
    return cli_env["OP_CELERY_BROKER_KEY_PREFIX"] + cli_env["OP_CELERY_QUEUE"]
