"""``op-celery send``: one event from the shell, straight to the API or through the queue."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import click

from .._app import publishing_app
from .._enqueue import NO_SPOOL, queue_for, task_for
from .._events import OPERATIONS, build_event, normalize_call
from .._exceptions import (
    AuthenticationError,
    DeliveryError,
    InvalidEvent,
    InvalidPayload,
    NetworkError,
    ProfileNotFound,
    PublishError,
    RateLimited,
    TransientError,
)
from .._settings import Settings
from ._main import broker_description, command_settings, main

__all__ = ["send"]


#: Which task argument each option of `send` fills, per operation.
_SEND_ARGUMENTS: dict[str, dict[str, str]] = {
    "track": {
        "name": "name", "properties": "properties", "profile_id": "profile_id",
        "group_ids": "groups", "timestamp": "timestamp", "device_id": "device_id",
    },
    "revenue": {
        "amount": "amount", "properties": "properties", "profile_id": "profile_id",
        "group_ids": "groups", "timestamp": "timestamp", "device_id": "device_id",
    },
    "identify": {
        "profile_id": "profile_id", "first_name": "first_name", "last_name": "last_name",
        "email": "email", "avatar": "avatar", "properties": "properties",
    },
    "alias": {"profile_id": "profile_id", "alias": "alias"},
    "increment": {"profile_id": "profile_id", "property_name": "property", "value": "value"},
    "decrement": {"profile_id": "profile_id", "property_name": "property", "value": "value"},
    "group": {
        "group_ids": "id", "group_type": "type", "name": "name", "properties": "properties",
    },
    "assign_group": {"group_ids": "group_ids", "profile_id": "profile_id"},
}  # fmt: skip
_OPTION_NAMES = {"properties": "--property", "group_ids": "--group-id"}


def _option(parameter: str) -> str:
    return _OPTION_NAMES.get(parameter, "--" + parameter.replace("_", "-"))


def _parse_property(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"expected KEY=VALUE, got {text!r}", param_hint="--property")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def _parse_value(
    ctx: click.Context, param: click.Parameter, text: str | None
) -> int | float | None:
    if text is None:
        return None
    try:
        number = float(text)
    except ValueError:
        raise click.BadParameter(f"expected a number, got {text!r}") from None
    return int(number) if number.is_integer() and "." not in text else number


def _send_kwargs(operation: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The task's keyword arguments from the options given; an option that does not apply to
    the operation is a usage error rather than silently dropped."""
    arguments = _SEND_ARGUMENTS[operation]
    kwargs: dict[str, Any] = {}
    for parameter, value in given.items():
        if value is None or value == ():
            continue
        if parameter not in arguments:
            applies = ", ".join(sorted({_option(p) for p in arguments}))
            raise click.UsageError(
                f"{_option(parameter)} does not apply to {operation}; it takes {applies}"
            )
        if parameter == "properties":
            value = dict(_parse_property(item) for item in value)
        elif parameter == "group_ids" and operation == "group":
            if len(value) != 1:
                raise click.UsageError("group takes exactly one --group-id (the group's id)")
            value = value[0]
        elif parameter == "group_ids":
            value = list(value)
        kwargs[arguments[parameter]] = value
    return kwargs


def _invalid(exc: InvalidEvent, operation: str) -> click.ClickException:
    options = {argument: _option(option) for option, argument in _SEND_ARGUMENTS[operation].items()}
    hint = options.get(exc.field)
    return click.ClickException(f"{exc} ({hint})" if hint else str(exc))


def _show_body(body: Any) -> str:
    return json.dumps(body) if isinstance(body, (dict, list)) else str(body)


@main.command()
@click.argument("operation", type=click.Choice(list(OPERATIONS)), metavar="OPERATION")
@click.option("--name", help="Event name (track), or the group's name (group).")
@click.option(
    "--property", "properties", multiple=True, metavar="KEY=VALUE",
    help="A property (track, identify, group); repeatable. VALUE is read as JSON when it "
    "parses (12, true, [1,2], {\"a\":1}), else as a string.",
)  # fmt: skip
@click.option("--profile-id", help="The profile (required by identify, alias, increment...).")
@click.option(
    "--group-id", "group_ids", multiple=True,
    help="track: a group of the event; assign_group: a group to join (repeatable); "
    "group: the group's id.",
)  # fmt: skip
@click.option("--group-type", help="group: the group's type, e.g. company.")
@click.option("--first-name", help="identify: first name.")
@click.option("--last-name", help="identify: last name.")
@click.option("--email", help="identify: e-mail address.")
@click.option("--avatar", help="identify: avatar URL.")
@click.option("--alias", help="alias: the other id of the profile.")
@click.option("--property-name", help="increment/decrement: the profile property to change.")
@click.option(
    "--value",
    callback=_parse_value,
    metavar="NUMBER",
    help="increment/decrement: a positive number (default 1).",
)
@click.option("--timestamp", help="track: when it happened, ISO 8601 with a zone (default now).")
@click.option("--amount", type=int, help="revenue: the amount in minor units (cents).")
@click.option("--device-id", help="track, revenue: the device id (properties.__deviceId).")
@click.option("--client-ip", help="The end user's IP address (forwarded as openpanel-client-ip).")
@click.option("--user-agent", help="The end user's user agent (default: a server event).")
@click.option(
    "--project", default="default", show_default=True,
    help="Project whose credentials to use (OPENPANEL_<PROJECT>_CLIENT_ID ...).",
)  # fmt: skip
@click.option(
    "--enqueue", is_flag=True,
    help="Enqueue it with .delay() for the workers instead of sending it from here.",
)  # fmt: skip
def send(
    operation: str, project: str, enqueue: bool, client_ip: str | None, user_agent: str | None,
    **options: Any,
) -> None:  # fmt: skip
    """Send one event from the shell, like OpenPanel's cURL guide.

    OPERATION is one of track, revenue, identify, alias, increment, decrement, group,
    assign_group. By default the event goes straight to the API with the project's credentials
    from the environment, and the server's status and answer are printed; it is sent once,
    never retried, and a refusal leaves no dead letter. With --enqueue it goes through the
    queue, as .delay() would (on your app's broker with -A), and the workers deliver and retry
    it.

    \b
    op-celery send track --name signup --property plan=pro --profile-id user-1
    op-celery send identify --profile-id user-1 --email ada@example.com
    op-celery send increment --profile-id user-1 --property-name visits --value 2
    op-celery send revenue --amount 1299 --property currency=USD --profile-id user-1
    op-celery send group --group-id acme --group-type company --name "Acme Inc"
    """
    kwargs = _send_kwargs(operation, options)
    kwargs.update(project=project, client_ip=client_ip, user_agent=user_agent)
    settings = command_settings()
    try:
        message = normalize_call(operation, (), kwargs)
    except InvalidEvent as exc:
        raise _invalid(exc, operation) from None
    if enqueue:
        _enqueue_event(operation, message, settings)
        return
    from .._client import Dropped, OpenPanelClient

    event = build_event(operation, message)
    client = OpenPanelClient.for_project(
        settings.project(project),
        connect_timeout_s=settings.connect_timeout_s,
        read_timeout_s=settings.read_timeout_s,
    )
    try:
        delivered = client.send(event)
    except DeliveryError as exc:
        raise click.ClickException(f"not accepted: {_what_now(exc)}") from None
    click.echo(f"HTTP {delivered.status} from {client.api_url}/track (event {event.event_id})")
    if isinstance(delivered, Dropped):
        click.echo(f"not stored by the server ({delivered.reason}): {delivered.message}")
        return
    click.echo(_show_body(delivered.body))


#: What the client's messages promise that `send` does not do: it sends once, from here, and
#: keeps nothing (no retry, no dead letter to replay).
_WORKER_ADVICE = re.compile(
    r"; (?:rate limited, |server error, |the profile may not be processed yet, )?will retry$"
    r"|, then replay (?:it|the dead letters)$"
)


def _what_now(exc: DeliveryError) -> str:
    """The server's refusal as `send` met it: sent once, not retried, nothing kept."""
    text = _WORKER_ADVICE.sub("", str(exc))
    if isinstance(exc, RateLimited):
        wait = f"after {exc.retry_after:g} s" if exc.retry_after else "in a moment"
        return f"{text}; rate limited: sent once, not retried; send again {wait}"
    if isinstance(exc, ProfileNotFound):
        return f"{text}; no such profile yet: send identify for it first, then this again"
    if isinstance(exc, NetworkError):
        maybe = " (it may have arrived)" if getattr(exc, "maybe_delivered", False) else ""
        return (
            f"{text}{maybe}; sent once, not retried: check OPENPANEL_API_URL and the network, or "
            "use --enqueue to let the workers retry it"
        )
    if isinstance(exc, TransientError):
        return (
            f"{text}; sent once, not retried: send again, or use --enqueue to let the workers "
            "retry it"
        )
    if isinstance(exc, (InvalidPayload, AuthenticationError)):
        return f"{text}, then send again"
    return text


def _enqueue_event(operation: str, message: dict[str, Any], settings: Settings) -> None:
    task = task_for(operation)  # the lines below name the broker
    try:
        # From a shell, a broker that does not answer is said at once, not hidden in the spool.
        no_spool: dict[str, Any] = {NO_SPOOL: True}
        result = task.apply_async((), message, **no_spool)
    except PublishError:
        raise click.ClickException(
            f"the broker at {broker_description(settings)} did not answer within "
            f"{settings.publish_timeout_s:g} s: the event was not enqueued (without --enqueue "
            "it is sent to the API directly)"
        ) from None
    queue = queue_for(publishing_app(), f"op_celery.{operation}", settings, message)
    click.echo(
        f"Enqueued {operation} event {message['event_id']} (task {result.id}) on queue "
        f"{queue} at {broker_description(settings)}; the workers deliver it, retrying as they do"
    )
