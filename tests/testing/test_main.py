"""``python -m op_celery.testing`` (`__main__`), in real subprocesses."""

from __future__ import annotations

import argparse
import os
import pty
import select
import selectors
import signal
import subprocess
import sys

import pytest
import requests

from op_celery._exceptions import ConfigurationError
from op_celery._rates import parse_rate
from op_celery.testing import StandInControl
from op_celery.testing.__main__ import parse_client, parse_rate_limit
from op_celery.testing._control import CONTROL_ENDPOINTS

from ._support import AUTH, CLIENT_ID, SECRET, TIMEOUT_S, TRACK, rate_headers

# --- python -m op_celery.testing ------------------------------------------------------------


def test_parse_rate_limit_reads_limit_and_window() -> None:
    assert parse_rate_limit("50/1s") == (50, 1.0)
    assert parse_rate_limit("50/s") == (50, 1.0)
    assert parse_rate_limit("100/10s") == (100, 10.0)
    assert parse_rate_limit("5/500ms") == (5, 0.5)
    assert parse_rate_limit("1000/1m") == (1000, 60.0)
    assert parse_client(f"{CLIENT_ID}:a:b") == (CLIENT_ID, "a:b")


@pytest.mark.parametrize("text", ["fast", "100/10", "0/s", "1.5/s", "50/1d"])
def test_parse_rate_limit_accepts_what_openpanel_rate_limit_accepts_and_nothing_else(
    text: str,
) -> None:
    with pytest.raises(ConfigurationError) as setting_error:
        parse_rate(text)
    with pytest.raises(argparse.ArgumentTypeError) as flag_error:
        parse_rate_limit(text)
    assert str(flag_error.value) == str(setting_error.value).replace(
        "OPENPANEL_RATE_LIMIT", "--rate-limit"
    )


def test_the_command_refuses_a_bad_rate_with_exit_status_2_and_the_accepted_forms() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "op_celery.testing", "--rate-limit", "100/10"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--rate-limit='100/10' is not a rate" in result.stderr
    assert '"100/10s"' in result.stderr


def test_the_command_prints_the_url_serves_and_exits_0_on_sigterm() -> None:
    command = [sys.executable, "-m", "op_celery.testing", "--port", "0"]
    command += ["--client", f"{CLIENT_ID}:{SECRET}", "--rate-limit", "2/60s"]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Without PYTHONUNBUFFERED stdout is a buffered pipe: the code itself must flush.
        env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
    )
    try:
        assert process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            assert selector.select(timeout=15), "no URL line within 15 s"
        line = process.stdout.readline()
        assert line.startswith("OPENPANEL_API_URL=http://127.0.0.1:")
        url = line.strip().split("=", 1)[1]
        statuses = [
            requests.post(f"{url}/track", json=TRACK, headers=AUTH, timeout=TIMEOUT_S).status_code
            for _ in range(3)
        ]
        assert statuses == [200, 200, 429]
        control = StandInControl(url, timeout=TIMEOUT_S)
        assert control.counts() == {200: 2, 429: 1}
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        assert process.stdout.read() == ""  # exactly one line
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=15)


def test_the_command_refuses_a_malformed_client_with_exit_status_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "op_celery.testing", "--client", "no-secret"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "CLIENT_ID:SECRET" in result.stderr


def test_the_command_sends_the_rate_limit_header_mode_it_is_given() -> None:
    command = [sys.executable, "-m", "op_celery.testing", "--client", f"{CLIENT_ID}:{SECRET}"]
    command += ["--rate-limit", "1/60s", "--rate-limit-headers", "retry-after"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip().split("=", 1)[1]
        answers = [
            requests.post(f"{url}/track", json=TRACK, headers=AUTH, timeout=TIMEOUT_S)
            for _ in range(2)
        ]
        assert [a.status_code for a in answers] == [200, 429]
        assert [rate_headers(a) for a in answers] == [{}, {"retry-after": "60"}]
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0


def test_the_command_refuses_an_unknown_header_mode_with_exit_status_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "op_celery.testing", "--rate-limit-headers", "some"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "'retry-after'" in result.stderr


# --- One line per request, and --help. -----------------------------------------------------

WRONG_SECRET_AUTH = {**AUTH, "openpanel-client-secret": "sec_wrong-secret"}


def send_three(url: str) -> None:
    """A 200 track, a 401 identify (wrong secret) and a control call."""
    assert requests.post(f"{url}/track", json=TRACK, headers=AUTH, timeout=TIMEOUT_S).ok
    identify = {"type": "identify", "payload": {"profileId": "u1"}}
    refused = requests.post(
        f"{url}/track", json=identify, headers=WRONG_SECRET_AUTH, timeout=TIMEOUT_S
    )
    assert refused.status_code == 401
    StandInControl(url, timeout=TIMEOUT_S).stats()


EXPECTED_LINES = [
    f'POST /track 200 client={CLIENT_ID} track "signup"',
    f"POST /track 401 client={CLIENT_ID} identify",
    "GET /__stand-in/stats 200",
]


def test_with_log_requests_the_command_prints_one_line_per_request_and_never_the_secret() -> None:
    command = [sys.executable, "-m", "op_celery.testing", "--client", f"{CLIENT_ID}:{SECRET}"]
    process = subprocess.Popen([*command, "--log-requests"], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip().split("=", 1)[1]
        send_three(url)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    assert process.stdout is not None
    output = process.stdout.read()
    # One line per request; each is written once its answer has gone, by the connection's
    # own thread, so two requests in a row may be logged in either order.
    assert sorted(line.split(" ", 1)[1] for line in output.splitlines()) == sorted(EXPECTED_LINES)
    assert SECRET not in output and "sec_wrong-secret" not in output


def run_on_a_terminal(command: list[str]) -> list[str]:
    """Run ``command`` with a pseudo-terminal as stdout, send `send_three`; its output lines."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(command, stdout=terminal, stdin=subprocess.DEVNULL)
    os.close(terminal)
    output = b""
    try:
        while b"\n" not in output:
            assert select.select([controller], [], [], 15)[0], "no URL line within 15 s"
            output += os.read(controller, 4096)
        url = output.split(b"\n", 1)[0].decode().strip().split("=", 1)[1]
        send_three(url)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        while select.select([controller], [], [], 0)[0]:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the process is gone and the terminal drained
                break
            if not chunk:
                break
            output += chunk
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=15)
        os.close(controller)
    return output.decode().replace("\r\n", "\n").splitlines()


def test_on_a_terminal_the_command_prints_the_lines_by_default() -> None:
    command = [sys.executable, "-m", "op_celery.testing", "--client", f"{CLIENT_ID}:{SECRET}"]
    url_line, *lines = run_on_a_terminal(command)
    assert url_line.startswith("OPENPANEL_API_URL=")
    # One line per request; each is written once its answer has gone, by the connection's
    # own thread, so two requests in a row may be logged in either order.
    assert sorted(line.split(" ", 1)[1] for line in lines) == sorted(EXPECTED_LINES)


def test_quiet_turns_the_lines_off_even_on_a_terminal() -> None:
    command = [sys.executable, "-m", "op_celery.testing", "--client", f"{CLIENT_ID}:{SECRET}"]
    url_line, *lines = run_on_a_terminal([*command, "--quiet"])
    assert url_line.startswith("OPENPANEL_API_URL=")
    assert lines == []


def test_op_celery_stand_in_prints_the_lines_too() -> None:
    command = [sys.executable, "-m", "op_celery.cli", "stand-in"]
    url_line, *lines = run_on_a_terminal([*command, "--client", f"{CLIENT_ID}:{SECRET}"])
    assert url_line.startswith("OPENPANEL_API_URL=")
    # One line per request; each is written once its answer has gone, by the connection's
    # own thread, so two requests in a row may be logged in either order.
    assert sorted(line.split(" ", 1)[1] for line in lines) == sorted(EXPECTED_LINES)


def test_help_lists_every_control_endpoint_and_the_header_modes() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "op_celery.testing", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0
    listed = {
        (fields[0], fields[1])
        for fields in (line.split() for line in result.stdout.splitlines())
        if len(fields) >= 2 and fields[0] in ("GET", "POST")
    }
    assert listed == {(method, name) for method, name, _, _ in CONTROL_ENDPOINTS}
    assert "/__stand-in/" in result.stdout
    assert "--quiet" in result.stdout and "--log-requests" in result.stdout
    assert "{all,retry-after,none}" in result.stdout
