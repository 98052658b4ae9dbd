"""Enqueue one event of every OpenPanel operation, as a web app would.

Run a worker beside it (``celery -A op_celery.worker worker``) with the settings in the
environment (see the README); this script needs only the broker, never the client secret.
"""

from __future__ import annotations

from datetime import datetime, timezone

import op_celery


def main() -> int:
    browser = "Mozilla/5.0 (X11; Linux x86_64; rv:140.0) Gecko/20100101 Firefox/140.0"
    op_celery.identify.delay(
        "user-42", first_name="Ada", last_name="Lovelace", email="ada@example.com",
        properties={"plan": "pro"}, client_ip="203.0.113.7", user_agent=browser,
    )  # fmt: skip
    op_celery.track.delay(
        "checkout_completed", properties={"cart_value": 129.5, "items": 3},
        profile_id="user-42", groups=["acme"], timestamp=datetime.now(timezone.utc),
        client_ip="203.0.113.7", user_agent=browser,
    )  # fmt: skip
    op_celery.revenue.delay(12950, {"currency": "USD"}, profile_id="user-42")  # 129.50 USD
    op_celery.increment.delay("user-42", "logins")
    op_celery.decrement.delay("user-42", "credits", value=5)
    op_celery.group.delay("acme", "company", "Acme Inc", properties={"seats": 12})
    op_celery.assign_group.delay(["acme"], profile_id="user-42")
    op_celery.alias.delay("user-42", "anonymous-7f3a")
    print("enqueued 8 events: identify, 2 track, increment, decrement, group, assign_group, alias")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
