"""``op-celery stand-in``: a stand-in server in the foreground, as a real subprocess."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from op_celery import InvalidPayload, OpenPanelClient, ProfileNotFound, build_event
from op_celery.testing import StandInControl

from .._support import CLIENT_ID, CLIENT_SECRET


def test_stand_in_serves_until_sigterm(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "op_celery.cli", "stand-in", "--client",
               f"{CLIENT_ID}:{CLIENT_SECRET}"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("OPENPANEL_API_URL=http://127.0.0.1:"), line
        client = OpenPanelClient(CLIENT_ID, CLIENT_SECRET, line.split("=", 1)[1])
        assert client.send(build_event("track", {"name": "hello"})).status == 200
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0


def test_stand_in_prints_a_line_per_request_and_lists_its_control_endpoints() -> None:
    command = [sys.executable, "-m", "op_celery.cli", "stand-in", "--log-requests", "--client",
               f"{CLIENT_ID}:{CLIENT_SECRET}"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip().split("=", 1)[1]
        client = OpenPanelClient(CLIENT_ID, CLIENT_SECRET, url)
        client.send(build_event("track", {"name": "seen"}))
        line = process.stdout.readline()
        assert "POST /track 200" in line and "seen" in line and CLIENT_SECRET not in line
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0

    help_text = subprocess.run(
        [sys.executable, "-m", "op_celery.cli", "stand-in", "--help"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "control endpoints under /__stand-in/" in help_text
    assert "POST fail" in help_text and "--rate-limit-headers" in help_text
    assert "--profile-flush" in help_text and "POST profile-flush" in help_text


@pytest.mark.parametrize("flush", [None, "0"])
def test_stand_in_makes_profiles_visible_after_the_servers_flush_unless_told_otherwise(
    flush: str | None,
) -> None:
    command = [sys.executable, "-m", "op_celery.cli", "stand-in", "--quiet", "--client",
               f"{CLIENT_ID}:{CLIENT_SECRET}"]  # fmt: skip
    if flush is not None:
        command += ["--profile-flush", flush]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip().split("=", 1)[1]
        client = OpenPanelClient(CLIENT_ID, CLIENT_SECRET, url)
        client.send(build_event("identify", {"profile_id": "u1", "properties": {"n": "x"}}))
        increment = build_event("increment", {"profile_id": "u1", "property": "n"})
        control = StandInControl(url)
        if flush is None:  # the server's 10 s: not found until the flush
            with pytest.raises(ProfileNotFound):
                client.send(increment)
            control.advance(10)
        # Found now, and its value is no number: the server's 400.
        with pytest.raises(InvalidPayload, match="Property value is not a number"):
            client.send(increment)
        assert control.profile("u1", CLIENT_ID) == {"n": "x"}
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
