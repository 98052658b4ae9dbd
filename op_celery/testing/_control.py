"""The control endpoints, ``/__stand-in/...``: the server's side and `StandInControl`, its client.

Every endpoint takes and returns JSON; a bad body gets 400 with the reason, an unknown name 404.
Control requests are never delayed, faulted, rate-limited or recorded.

`CONTROL_ENDPOINTS` lists them (``python -m op_celery.testing --help`` prints it); each has a
`StandInControl` method of the same meaning.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any, Final

from op_celery.testing._answers import Answer, json_answer
from op_celery.testing._model import (
    ApiModel,
    RateLimitHeaders,
    Received,
    rate_limit_headers_mode,
)

__all__ = ["CONTROL_ENDPOINTS", "CONTROL_PREFIX", "StandInControl", "control_answer"]

#: Prefix of the control endpoints.
CONTROL_PREFIX: Final = "/__stand-in/"
#: Every control endpoint: (method, name under `CONTROL_PREFIX`, JSON body, what it does).
CONTROL_ENDPOINTS: Final[tuple[tuple[str, str, str, str], ...]] = (
    ("GET", "received", "", "accepted (2xx) /track requests, oldest first"),
    ("GET", "requests", "", "every answered /track request, whatever its status"),
    ("GET", "counts", "", "answers to /track by status code"),
    ("GET", "stats", "", "totals: received, requests, dropped, connections"),
    ("POST", "reset", "", "forget requests, faults, latency, profiles and rate windows"),
    ("POST", "fail", '{"count": N, "status": 503, "body": null, "headers": {}}',
     "answer the next N /track requests with status"),
    ("POST", "fail", '{"seconds": S, "status": 503, ...}',
     "answer every /track request with status for S seconds"),
    ("POST", "fail", '{"count": N, "status": "bot"}',
     "a named answer of the real server: bot, duplicate, ip-filtered, profile-filtered, "
     "revenue-without-secret, captive-portal"),
    ("POST", "filters", '{"client_id": ID, "ips": [...], "profile_ids": [...]}',
     "the project's filters of that client (401 blocked by project filter); [] lifts them"),
    ("POST", "drop", '{"count": N}', "close the next N /track connections unanswered"),
    ("POST", "latency", '{"seconds": S}', "hold each /track answer S seconds; 0 turns it off"),
    ("POST", "rate-limit", '{"limit": N, "window": S, "headers": "all|retry-after|none"}',
     "fixed window of N requests per S seconds per client id; limit null lifts it"),
    ("POST", "advance", '{"seconds": S}',
     "move the rate-limit, outage and profile-flush clock S seconds on"),
    ("POST", "profile-flush", '{"seconds": S}',
     "profile writes visible to increment/decrement S seconds on (server: 10); 0: at once"),
    ("POST", "profile", '{"client_id": ID, "profile_id": P}',
     "the profile's properties as increment reads them now; null while not found"),
    ("POST", "clients", '{"client_id": ID, "secret": SECRET}', "accept one more client"),
)  # fmt: skip


def control_answer(model: ApiModel, method: str, path: str, raw: bytes) -> Answer:
    """Serve ``/__stand-in/...``; see `StandInControl` for what each endpoint does."""
    name = path[len(CONTROL_PREFIX) :]
    try:
        data = json.loads(raw) if raw else {}
        if not isinstance(data, dict):
            raise ValueError("the body must be a JSON object")
        if method == "GET" and name == "received":
            return json_answer(200, [r.to_json() for r in model.received])
        if method == "GET" and name == "requests":
            return json_answer(200, [r.to_json() for r in model.requests])
        if method == "GET" and name == "counts":
            return json_answer(200, {str(k): v for k, v in sorted(model.counts().items())})
        if method == "GET" and name == "stats":
            return json_answer(200, model._stats())
        if method == "POST" and name == "reset":
            model.reset()
        elif method == "POST" and name == "fail":
            raw_status = data.get("status", 503)
            status = raw_status if isinstance(raw_status, str) else int(raw_status)
            body, headers = data.get("body"), data.get("headers")
            if not isinstance(body, str | None) or not isinstance(headers, dict | None):
                raise TypeError("body must be a string and headers an object")
            if "seconds" in data:
                model.fail_for(float(data["seconds"]), status, body, headers)
            else:
                model.fail_next(int(data["count"]), status, body, headers)
        elif method == "POST" and name == "drop":
            model.drop_next(int(data["count"]))
        elif method == "POST" and name == "latency":
            model.set_latency(float(data["seconds"]))
        elif method == "POST" and name == "rate-limit":
            limit, window = data.get("limit"), data.get("window")
            model.set_rate_limit(
                None if limit is None else int(limit),
                None if window is None else float(window),
                headers=rate_limit_headers_mode(data.get("headers", "all")),
            )
        elif method == "POST" and name == "advance":
            model.advance(float(data["seconds"]))
        elif method == "POST" and name == "filters":
            ips, profile_ids = data.get("ips") or [], data.get("profile_ids") or []
            if not all(isinstance(x, str) for x in [*ips, *profile_ids]):
                raise TypeError("ips and profile_ids must be lists of strings")
            model.set_filters(
                str(data["client_id"]), ips=tuple(ips), profile_ids=tuple(profile_ids)
            )
        elif method == "POST" and name == "profile-flush":
            model.set_profile_flush(float(data["seconds"]))
        elif method == "POST" and name == "profile":
            profile_id = data["profile_id"]
            if not isinstance(profile_id, str | int | float) or isinstance(profile_id, bool):
                raise TypeError("profile_id must be a string or a number")
            return json_answer(200, model.profile(profile_id, str(data["client_id"])))
        elif method == "POST" and name == "clients":
            model.add_client(str(data["client_id"]), str(data["secret"]))
        else:
            return json_answer(404, {"error": f"no control endpoint {method} {path}"})
    except (ValueError, KeyError, TypeError) as exc:
        return json_answer(400, {"error": f"{type(exc).__name__}: {exc}"})
    return json_answer(200, {"ok": True})


class StandInControl:
    """Drive and read a `StandInServer` over its ``/__stand-in/...`` endpoints.

    For a server in another process (``python -m op_celery.testing``); in-process tests can call
    the server's methods directly. Uses ``urllib`` without proxies, so it needs no extra
    package and never sends loopback traffic to an ``HTTP_PROXY``. Every method is one request,
    except `wait_for`, which polls.
    """

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _call(self, method: str, name: str, data: Mapping[str, Any] | None = None) -> Any:
        body = None if data is None else json.dumps(data).encode()
        request = urllib.request.Request(
            f"{self.url}{CONTROL_PREFIX}{name}",
            data=body,
            method=method,
            headers={"content-type": "application/json"},
        )
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")
            raise RuntimeError(f"stand-in control {method} {name}: {exc.code} {detail}") from exc

    def received(self) -> list[Received]:
        """Accepted (2xx) ``/track`` requests (``GET /__stand-in/received``)."""
        return [Received.from_json(item) for item in self._call("GET", "received")]

    def requests(self) -> list[Received]:
        """Every answered ``/track`` request (``GET /__stand-in/requests``)."""
        return [Received.from_json(item) for item in self._call("GET", "requests")]

    def counts(self) -> dict[int, int]:
        """Answers by status code (``GET /__stand-in/counts``)."""
        return {int(k): int(v) for k, v in self._call("GET", "counts").items()}

    def stats(self) -> dict[str, int]:
        """Totals: received, requests, dropped, connections (``GET /__stand-in/stats``)."""
        return {str(k): int(v) for k, v in self._call("GET", "stats").items()}

    def reset(self) -> None:
        """`StandInServer.reset` (``POST /__stand-in/reset``)."""
        self._call("POST", "reset", {})

    def fail_next(
        self,
        count: int,
        status: int | str = 503,
        body: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """`StandInServer.fail_next` (``POST /__stand-in/fail`` with ``count``)."""
        self._fail({"count": count}, status, body, headers)

    def fail_for(
        self,
        seconds: float,
        status: int | str = 503,
        body: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """`StandInServer.fail_for` (``POST /__stand-in/fail`` with ``seconds``)."""
        self._fail({"seconds": seconds}, status, body, headers)

    def _fail(
        self,
        how_long: dict[str, float],
        status: int | str,
        body: str | None,
        headers: Mapping[str, str] | None,
    ) -> None:
        data = {**how_long, "status": status, "body": body, "headers": dict(headers or {})}
        self._call("POST", "fail", data)

    def drop_next(self, count: int) -> None:
        """`StandInServer.drop_next` (``POST /__stand-in/drop``)."""
        self._call("POST", "drop", {"count": count})

    def set_latency(self, seconds: float) -> None:
        """`StandInServer.set_latency` (``POST /__stand-in/latency``)."""
        self._call("POST", "latency", {"seconds": seconds})

    def set_rate_limit(
        self,
        limit: int | None,
        window_seconds: float | None = None,
        *,
        headers: RateLimitHeaders = "all",
    ) -> None:
        """`StandInServer.set_rate_limit` (``POST /__stand-in/rate-limit``)."""
        data = {"limit": limit, "window": window_seconds, "headers": headers}
        self._call("POST", "rate-limit", data)

    def advance(self, seconds: float) -> None:
        """`StandInServer.advance` (``POST /__stand-in/advance``)."""
        self._call("POST", "advance", {"seconds": seconds})

    def set_filters(
        self, client_id: str, *, ips: tuple[str, ...] = (), profile_ids: tuple[str, ...] = ()
    ) -> None:
        """`StandInServer.set_filters` (``POST /__stand-in/filters``)."""
        data = {"client_id": client_id, "ips": list(ips), "profile_ids": list(profile_ids)}
        self._call("POST", "filters", data)

    def set_profile_flush(self, seconds: float) -> None:
        """`StandInServer.set_profile_flush` (``POST /__stand-in/profile-flush``)."""
        self._call("POST", "profile-flush", {"seconds": seconds})

    def profile(self, profile_id: str | int | float, client_id: str) -> dict[str, Any] | None:
        """`StandInServer.profile` (``POST /__stand-in/profile``)."""
        found: dict[str, Any] | None = self._call(
            "POST", "profile", {"client_id": client_id, "profile_id": profile_id}
        )
        return found

    def add_client(self, client_id: str, secret: str) -> None:
        """`StandInServer.add_client` (``POST /__stand-in/clients``)."""
        self._call("POST", "clients", {"client_id": client_id, "secret": secret})

    def wait_for(self, count: int, timeout: float = 10.0, poll_seconds: float = 0.05) -> bool:
        """Poll until at least ``count`` requests were accepted; False if ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        while True:
            if self.stats()["received"] >= count:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_seconds)
