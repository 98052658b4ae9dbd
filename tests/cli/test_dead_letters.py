"""``op-celery dead-letters``: list, replay and purge against the shared Redis."""

from __future__ import annotations

import json

import redis

from op_celery.dead_letters import DeadLetterStore

from ._support import letter, run


def test_dead_letters_list_prints_a_table_filters_and_limits(store: DeadLetterStore) -> None:
    first = letter()
    shop = letter(project="shop", error_type="InvalidPayload", status=400, error="HTTP 400 bad")
    store.add(first)
    store.add(shop)

    result = run("dead-letters", "list")
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert header.split() == [
        "id", "operation", "project", "error_type", "status", "attempts", "failed_at",
    ]  # fmt: skip
    assert [row.split()[0] for row in rows] == [first.id, shop.id]
    assert rows[1].split()[1:6] == ["track", "shop", "InvalidPayload", "400", "1"]

    assert shop.id not in run("dead-letters", "list", "--project", "default").output
    assert first.id not in run("dead-letters", "list", "--error", "400").output
    assert len(run("dead-letters", "list", "--limit", "1").stdout.splitlines()) == 2
    assert "No dead letters match." in run("dead-letters", "list", "--project", "x").output


def test_dead_letters_list_json_is_one_array_of_every_field(store: DeadLetterStore) -> None:
    kept = letter(kwargs={"name": "signup", "project": "default"})
    store.add(kept)
    result = run("dead-letters", "list", "--json")
    assert result.exit_code == 0, result.output
    [entry] = json.loads(result.stdout)
    assert entry["id"] == kept.id and entry["kwargs"]["name"] == "signup"
    assert entry["error_type"] == "AuthenticationError" and entry["replayable"] is True
    assert json.loads(run("dead-letters", "list", "--json", "--project", "x").stdout) == []


def test_replay_re_enqueues_each_dead_letter_once_even_when_run_twice(
    store: DeadLetterStore, redis_client: redis.Redis, queue_key: str
) -> None:
    for _ in range(3):
        store.add(letter())
    store.add(letter(operation="unknown", replayable=False, error_type="PoisonMessage"))

    result = run("dead-letters", "replay", "--yes")
    assert result.exit_code == 0, result.output
    assert "Re-enqueued 3 dead letters; 1 not replayable" in result.output
    assert redis_client.llen(queue_key) == 3

    again = run("dead-letters", "replay", "--yes")
    assert again.exit_code == 0, again.output
    assert "No replayable dead letters match; 1 not replayable" in again.output
    assert redis_client.llen(queue_key) == 3
    assert len(store) == 1


def test_replay_asks_first_and_does_nothing_on_no(
    store: DeadLetterStore, redis_client: redis.Redis, queue_key: str
) -> None:
    store.add(letter())
    result = run("dead-letters", "replay", input="n\n")
    assert result.exit_code == 1 and "Re-enqueue 1 dead letters?" in result.output
    assert len(store) == 1 and redis_client.llen(queue_key) == 0


def test_purge_asks_first_and_deletes_only_what_matches(store: DeadLetterStore) -> None:
    store.add(letter())
    store.add(letter(error_type="InvalidPayload", status=400, error="HTTP 400 bad"))

    refused = run("dead-letters", "purge", input="n\n")
    assert refused.exit_code == 1 and "Delete 2 dead letters for good?" in refused.output
    assert len(store) == 2

    confirmed = run("dead-letters", "purge", "--error", "InvalidPayload", input="y\n")
    assert confirmed.exit_code == 0 and "Deleted 1 dead letters." in confirmed.output
    assert [x.error_type for x in store.list()] == ["AuthenticationError"]

    assert "Deleted 1 dead letters." in run("dead-letters", "purge", "--yes").output
    assert len(store) == 0
    assert "No dead letters match." in run("dead-letters", "purge", "--yes").output
