"""``op-celery spool flush``: re-publish spooled events, or say why not."""

from __future__ import annotations

import pytest
import redis

from op_celery._events import normalize_call
from op_celery._spool import Spool

from .._support import free_port
from ._support import one_line_error, run


def test_spool_flush_with_an_empty_spool_says_so(cli_env: dict[str, str]) -> None:
    result = run("spool", "flush")
    assert result.exit_code == 0, result.output
    assert "is empty: nothing to re-publish" in result.output


def test_spool_flush_republishes_a_spooled_event(
    cli_env: dict[str, str], redis_client: redis.Redis, queue_key: str
) -> None:
    spool = Spool(cli_env["OP_CELERY_SPOOL_DIR"])
    message = normalize_call("track", ("spooled",), {})
    spool.write("op_celery.track", message, {"queue": cli_env["OP_CELERY_QUEUE"]})

    result = run("spool", "flush")
    assert result.exit_code == 0, result.output
    assert "Re-published 1 spooled events" in result.output
    assert len(spool) == 0 and redis_client.llen(queue_key) == 1


def test_spool_flush_with_the_broker_down_keeps_the_file_and_says_so(
    cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(cli_env["OP_CELERY_SPOOL_DIR"])
    spool.write("op_celery.track", normalize_call("track", ("kept",), {}), {})
    monkeypatch.setenv("OP_CELERY_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")
    error = one_line_error(run("spool", "flush"))
    assert "still does not answer: 0 of 1" in error
    assert len(spool) == 1
