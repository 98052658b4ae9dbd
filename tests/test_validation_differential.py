"""`build_event` gives OpenPanel's own verdict on every body of the differential table.

``tests/data/openpanel_verdicts.json`` holds request bodies and the answer OpenPanel's
``POST /track`` body pipeline gave them (its zod schema and fastify's JSON parser, run under
Node at the commit named in the file). Each body is turned back into the task arguments that
would send it; op-celery must refuse exactly the bodies the server refuses, except the rows
marked ``"op_celery": "refuses"`` (deliberately stricter, with the reason in ``why``).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from op_celery import InvalidEvent, build_event
from op_celery._events import OPERATIONS

TABLE = json.loads((Path(__file__).parent / "data" / "openpanel_verdicts.json").read_text())
CASES: list[dict[str, Any]] = TABLE["cases"]


def _is_a_call(body: object) -> bool:
    """A body op-celery could send: {"type": str, "payload": dict}, no credentials in it."""
    return (
        isinstance(body, dict)
        and set(body) == {"type", "payload"}
        and isinstance(body["type"], str)
        and isinstance(body["payload"], dict)
    )


#: The rows that are task calls (the rest test the stand-in's handling of other bodies).
CALLS = [case for case in CASES if _is_a_call(json.loads(case["body"]))]

#: API field -> task argument, per operation (the inverse of the builders' mapping).
_ARGUMENTS = {
    "profileId": "profile_id",
    "firstName": "first_name",
    "lastName": "last_name",
    "groupIds": "group_ids",
}


def _call(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    payload = body["payload"]
    kwargs = {_ARGUMENTS.get(key, key): value for key, value in payload.items()}
    if body["type"] in OPERATIONS:  # a key the API does not have is no argument (zod strips it)
        kwargs = {k: v for k, v in kwargs.items() if k in OPERATIONS[body["type"]].params}
    if body["type"] == "track" and kwargs.get("groups", 0) is None:
        del kwargs["groups"]  # op-celery leaves a None out; the server takes null too
    return body["type"], kwargs


def _verdict(body: dict[str, Any]) -> tuple[bool, str]:
    operation, kwargs = _call(body)
    try:
        build_event(operation, kwargs)
    except InvalidEvent as exc:
        return False, str(exc)
    return True, ""


def test_the_table_is_large_names_its_source_and_holds_both_verdicts() -> None:
    assert TABLE["source"]["commit"] == "ed7bdddbadbe556719ac4b08963905a2de717ddd"
    assert len(CASES) >= 300 and len(CALLS) >= 300
    statuses = Counter(case["status"] for case in CASES)
    assert set(statuses) == {200, 400} and min(statuses.values()) > 100
    assert all(case["body"].isascii() for case in CASES)


@pytest.mark.parametrize("case", CALLS, ids=[case["id"] for case in CALLS])
def test_build_event_agrees_with_openpanel(case: dict[str, Any]) -> None:
    accepted, message = _verdict(json.loads(case["body"]))
    server_accepts = case["status"] == 200
    if case.get("op_celery") == "refuses":
        assert server_accepts and not accepted, case["why"]
        return
    assert accepted == server_accepts, (
        f"{case['note']}: OpenPanel {case['status']} {case['message']!r}, op-celery {message!r}"
    )


def test_every_refusal_names_the_argument_the_server_names() -> None:
    """Where the server points at one payload field, op-celery's error names that argument."""
    for case in CALLS:
        message = case["message"]
        if case["status"] != 400 or not message.startswith("body/payload/") or ", body/" in message:
            continue
        field = message.split(" ", 1)[0].split("/")[2]
        accepted, ours = _verdict(json.loads(case["body"]))
        assert not accepted
        argument = _ARGUMENTS.get(field, field)
        assert f": {argument}" in ours, (case["note"], message, ours)


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_the_stand_in_gives_openpanels_verdict(case: dict[str, Any]) -> None:
    """The stand-in server's body rules, on the same table, agree with OpenPanel on every row."""
    from op_celery.testing._validation import parse_body, validation_issues

    body, answer = parse_body({"content-type": "application/json"}, case["body"].encode())
    issues = ["(parse)"] if answer is not None else validation_issues(body)
    assert (not issues) == (case["status"] == 200), (case["note"], case["message"], issues)


def test_the_table_covers_every_blocked_fragment_and_path_scan_pattern() -> None:
    """Each entry of OpenPanel's lists has a refused row, so an edit to a list meets the table."""
    from op_celery._rules import BLOCKED_NAME_FRAGMENTS, PATH_SCAN_PATTERNS

    refused = [
        json.loads(case["body"])["payload"]["name"]
        for case in CASES
        if case["status"] == 400 and "blocked content" in case["message"]
    ]
    lowered = [name.lower() for name in refused]
    assert len(BLOCKED_NAME_FRAGMENTS) == 57
    for fragment in BLOCKED_NAME_FRAGMENTS:
        assert any(fragment in name for name in lowered), fragment
    for pattern in PATH_SCAN_PATTERNS:
        assert any(pattern.search(name) for name in refused), pattern.pattern


@pytest.mark.parametrize(
    "case",
    [case for case in CASES if case["status"] == 400 and "not valid JSON" not in case["message"]],
    ids=lambda case: case["id"],
)
def test_the_stand_in_gives_openpanels_400_message(case: dict[str, Any]) -> None:
    """Word for word: zod's texts, its order of issues, fastify's ``body/...`` formatting."""
    from op_celery.testing._validation import validation_message

    assert validation_message(json.loads(case["body"])) == case["message"], case["note"]


#: The rows whose body is a revenue event carrying an amount: what ``revenue.delay(amount)``
#: sends, so the revenue task must give each the server's verdict too.
REVENUES = [
    case
    for case in CALLS
    if json.loads(case["body"])["payload"].get("name") == "revenue"
    and (json.loads(case["body"])["payload"].get("properties") or {}).get("__revenue") is not None
]


@pytest.mark.parametrize("case", REVENUES, ids=[case["id"] for case in REVENUES])
def test_the_revenue_task_agrees_with_openpanel_on_every_revenue_row(case: dict[str, Any]) -> None:
    _, kwargs = _call(json.loads(case["body"]))
    properties = dict(kwargs.pop("properties"))
    kwargs.pop("name")
    amount = properties.pop("__revenue")
    try:
        build_event("revenue", {"amount": amount, "properties": properties, **kwargs})
    except InvalidEvent as exc:
        accepted, message = False, str(exc)
    else:
        accepted, message = True, ""
    # Deliberately stricter, as everywhere: an integer beyond 2**53 - 1 would be stored rounded.
    unsafe = isinstance(amount, (int, float)) and abs(amount) > 2**53 - 1
    assert accepted == (case["status"] == 200 and not unsafe), (case["note"], message)
    assert len(REVENUES) >= 12


DEVICE_IDS = json.loads((Path(__file__).parent / "data" / "openpanel_device_ids.json").read_text())


@pytest.mark.parametrize("case", DEVICE_IDS["cases"], ids=lambda case: repr(case["value"])[:24])
def test_device_id_is_refused_exactly_where_the_server_would_ignore_it(
    case: dict[str, Any],
) -> None:
    """``device_id=`` at ``.delay()`` and the stand-in's answer, against the server's own
    ``sanitizeOverrideDeviceId`` run under Node (JavaScript's trim, UTF-16 lengths)."""
    from op_celery.testing._answers import _override_device_id

    value, kept = case["value"], case["kept"]
    try:
        build_event("track", {"name": "x", "device_id": value})
    except InvalidEvent:
        accepted = False
    else:
        accepted = True
    assert accepted == (kept is not None) or value is None, case
    payload = {"name": "x", "properties": {"__deviceId": value}}
    assert _override_device_id("track", payload) == kept


def test_the_device_id_table_names_its_source_and_holds_both_verdicts() -> None:
    assert DEVICE_IDS["source"]["commit"] == TABLE["source"]["commit"]
    kept = [case["kept"] for case in DEVICE_IDS["cases"]]
    assert len(kept) >= 30 and None in kept and any(k is not None for k in kept)
