"""The framework examples run: each is imported and its endpoints hit with the framework's own
test client; what they enqueue is captured from a real Celery app on the in-memory broker."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from .contrib._support import BROWSER, CLIENT, Published, capturing_publishes, configure_django

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>/app.py`` as the module ``example_<name>`` (once)."""
    module_name = f"example_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / name / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # Django imports its URLconf by this name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


@pytest.fixture
def published() -> Iterator[list[Published]]:
    with capturing_publishes() as messages:
        yield messages


def sent(published: list[Published]) -> list[tuple[str, str | None, str | None]]:
    return [
        (m.task.removeprefix("op_celery."), m.kwargs["client_ip"], m.kwargs["user_agent"])
        for m in published
    ]


def test_the_django_example(published: list[Published]) -> None:
    configure_django()
    from django.test import Client, override_settings

    example = load_example("django_app")
    with override_settings(
        ROOT_URLCONF=example.__name__, MIDDLEWARE=example.MIDDLEWARE, OPENPANEL=example.OPENPANEL
    ):
        client = Client(REMOTE_ADDR=CLIENT, HTTP_USER_AGENT=BROWSER)
        assert client.get("/").json() == {"enqueued": ["page_viewed"]}
        assert client.get("/signup").status_code == 200
    assert sent(published) == [
        ("track", CLIENT, BROWSER),
        ("identify", CLIENT, BROWSER),
        ("track", CLIENT, BROWSER),
    ]
    assert published[0].kwargs["properties"] == {"path": "/"}


def test_the_flask_example(published: list[Published]) -> None:
    example = load_example("flask_app")
    client = example.app.test_client()
    environ = {"REMOTE_ADDR": CLIENT}
    headers = {"User-Agent": BROWSER}
    assert client.get("/", environ_base=environ, headers=headers).json == {
        "enqueued": ["page_viewed"]
    }
    assert client.post("/login/user-42", environ_base=environ, headers=headers).status_code == 200
    assert sent(published) == [
        ("track", CLIENT, BROWSER),
        ("identify", CLIENT, BROWSER),
        ("increment", CLIENT, BROWSER),
    ]


def test_the_fastapi_example(published: list[Published]) -> None:
    from starlette.testclient import TestClient

    example = load_example("fastapi_app")
    client = TestClient(example.app, client=(CLIENT, 50000), headers={"User-Agent": BROWSER})
    assert client.get("/").json() == {"enqueued": ["page_viewed"]}
    assert client.post("/login/user-42").status_code == 200
    assert sent(published) == [
        ("track", CLIENT, BROWSER),
        ("identify", CLIENT, BROWSER),
        ("increment", CLIENT, BROWSER),
    ]


def test_the_plain_example_delivers_every_operation_through_a_real_worker(
    redis_url: str, key_prefix: str
) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "examples" / "plain" / "run_against_stand_in.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENPANEL_", "OP_CELERY_"))}
    env.update(
        OP_CELERY_BROKER_URL=redis_url,
        OP_CELERY_BROKER_KEY_PREFIX=key_prefix,
        OP_CELERY_KEY_PREFIX=key_prefix + "op-celery",
    )
    result = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=90
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "accepted 7 of 7 expected" in result.stdout
