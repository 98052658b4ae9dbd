"""``op-celery stand-in``: a stand-in server in the foreground, as a real subprocess."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from op_celery import OpenPanelClient, build_event

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
