"""``op-celery demo``: refusals in-process, the whole run as a real subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from op_celery._demo import remote_api

from ._support import one_line_error, run

#: Seconds the demo subprocess may take before the test gives up on it.
DEMO_TIMEOUT_S = 100


def test_demo_refuses_a_bad_rate_before_starting_anything(cli_env: dict[str, str]) -> None:
    assert "--rate-limit" in one_line_error(run("demo", "--rate-limit", "fast"))


def test_demo_with_real_credentials_asks_first_and_a_no_sends_nothing(
    cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENPANEL_API_URL", "https://api.openpanel.dev")
    for answer in ("n\n", ""):  # no, and no answer at all (a script, a pipe)
        result = run("demo", "--events", "10", input=answer)
        assert "send 10 demo events to the real project of client" in result.output
        assert "at https://api.openpanel.dev?" in result.output
        error = one_line_error(result)
        assert "demo not started: nothing was sent. Pass --real" in error
        assert "Enqueued" not in result.output and "workers" not in result.output


def test_demo_real_flag_without_credentials_and_dash_a_are_usage_errors(
    cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENPANEL_CLIENT_ID")
    real = run("demo", "--real")
    assert real.exit_code == 2 and "--real sends to the project of OPENPANEL_CLIENT_ID" in (
        real.output
    )
    app = run("-A", "proj.celery", "demo")
    assert app.exit_code == 2 and "the demo runs its own app and workers" in app.output


def test_only_an_api_off_this_machine_counts_as_a_real_project() -> None:
    credentials = {"OPENPANEL_CLIENT_ID": "id", "OPENPANEL_CLIENT_SECRET": "secret"}
    assert remote_api(credentials) == "https://api.openpanel.dev"
    for local in ("http://127.0.0.1:8080", "http://localhost:3000", "http://[::1]:9"):
        assert remote_api({**credentials, "OPENPANEL_API_URL": local}) is None
    assert remote_api({"OPENPANEL_API_URL": "https://op.example.com"}) is None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                found.append(f"{entry.name}: {cmdline}")
    return found


@pytest.mark.timeout(DEMO_TIMEOUT_S + 20)
def test_demo_with_no_setting_delivers_everything_and_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENPANEL_", "OP_CELERY_", "CELERY_")) and k != "REDIS_URL"
    }
    env.update(
        OP_CELERY_EMBEDDED_DB=str(tmp_path / "embedded.db"),
        XDG_CACHE_HOME=str(tmp_path / "cache"),
        TMPDIR=str(tmp_path),
    )
    command = [sys.executable, "-m", "op_celery.cli", "demo", "--events", "60",
               "--timeout", str(DEMO_TIMEOUT_S - 20)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=DEMO_TIMEOUT_S)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Traceback" not in output
    assert re.search(r"delivered\s+59\s+of 59 deliverable", output), output
    assert "All 59 deliverable events were delivered." in output
    assert re.search(r"retried\s+[1-9]", output), output  # the injected faults show

    [workers] = re.findall(r"workers\s+pids ([\d, ]+)", output)
    [embedded] = re.findall(r"embedded Redis, pid (\d+)", output)
    pids = [int(pid) for pid in workers.split(", ")] + [int(embedded)]
    assert len(pids) == 3
    assert not [pid for pid in pids if _alive(pid)], output
    assert _processes_mentioning(str(tmp_path)) == []
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(("op-celery-demo-", "tmp"))]
    assert left == []  # the demo's directory and the embedded server's are removed
