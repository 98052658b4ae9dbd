"""``adelay``: validation in the caller, the publish off the event loop, the same guarantees."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

import op_celery
from op_celery import _app
from op_celery._context import request_context
from op_celery.testing import capture

from ._support import free_port


@pytest.fixture
def user_app(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Celery]:
    for name, value in env.items():
        if name.startswith(("OPENPANEL_", "OP_CELERY_")):
            monkeypatch.setenv(name, value)
    app = Celery("user-async-app", set_as_current=True)
    app.conf.update(
        broker_url=env["OP_CELERY_BROKER_URL"],
        broker_transport_options={"global_keyprefix": env["OP_CELERY_BROKER_KEY_PREFIX"]},
        task_ignore_result=True,
    )
    _app.reset_settings()
    yield app
    app.close()
    _app.reset_settings()


def queued(redis_client: redis.Redis, env: dict[str, str]) -> int:
    return int(redis_client.llen(env["OP_CELERY_BROKER_KEY_PREFIX"] + env["OP_CELERY_QUEUE"]))


def test_adelay_enqueues_what_delay_enqueues(
    user_app: Celery, env: dict[str, str], redis_client: redis.Redis
) -> None:
    async def main() -> list[str]:
        results = await asyncio.gather(
            *(op_celery.track.adelay(f"e{i}", profile_id="u1") for i in range(20))
        )
        return [r.id for r in results]

    ids = asyncio.run(main())
    assert len(set(ids)) == 20
    assert queued(redis_client, env) == 20


def test_adelay_refuses_bad_input_before_its_first_await(user_app: Celery) -> None:
    coroutine = op_celery.track.adelay("")
    with pytest.raises(op_celery.InvalidEvent):
        coroutine.send(None)


def test_adelay_keeps_the_callers_request_context(user_app: Celery) -> None:
    async def main() -> None:
        with request_context("203.0.113.7", "Mozilla/5.0"):
            await op_celery.track.adelay("signup")

    with capture() as events:
        asyncio.run(main())
    assert (events[0].client_ip, events[0].user_agent) == ("203.0.113.7", "Mozilla/5.0")


def test_adelay_does_not_block_the_loop_while_the_broker_is_away(
    user_app: Celery, monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    user_app.conf.broker_url = f"redis://127.0.0.1:{free_port()}/0"  # refused
    monkeypatch.setenv("OP_CELERY_BROKER_URL", user_app.conf.broker_url)
    monkeypatch.setenv("OP_CELERY_SPOOL_DIR", str(tmp_path))
    _app.reset_settings()
    order: list[str] = []

    async def other_work() -> None:
        for _ in range(3):
            await asyncio.sleep(0)  # runs only if the loop is free
        order.append("other work")

    async def publish() -> None:
        await op_celery.track.adelay("signup")  # waits for the broker, then spools
        order.append("published")

    async def main() -> None:
        await asyncio.gather(publish(), other_work())

    asyncio.run(main())
    # The loop served other work while the publish waited for the absent broker.
    assert order == ["other work", "published"]
    assert list(Path(str(tmp_path)).glob("*.json")) or list(Path(str(tmp_path)).iterdir())
