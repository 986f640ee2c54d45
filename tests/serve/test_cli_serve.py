"""``flexgr serve`` as a user runs it: a subprocess on a free port, stopped with SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx

from tests.cli.helpers import assert_one_line_error, run


def test_serve_command_end_to_end(served_run: Path, tiny_home: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "flexgr", "serve", "--run-dir", str(served_run)]
    process = subprocess.Popen(
        [*command, "--port", "0", "--weights", "best", "--max-batch", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    watchdog = threading.Timer(120, process.kill)  # a hung server fails the test, never hangs it
    watchdog.daemon = True
    watchdog.start()
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # printed once the socket listens
        assert "best weights, 30 items, 48 users of tiny" in line, line + process.stderr.read()
        url = line.split(" on ", 1)[1].split()[0]
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/health").json()["status"] == "ok"
            assert client.get("/metadata").json()["weights"] == "best"
            body = client.post("/recommend", json={"user": "u5", "k": 2}).json()
            assert body["returned"] == 2
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=20)
        watchdog.cancel()
    assert code == 0, process.stderr.read() if process.stderr else code


def test_serve_user_errors_are_one_line(served_run: Path, tmp_path: Path) -> None:
    assert_one_line_error(run("serve", "--run-dir", tmp_path / "none"), "no run directory")
    assert_one_line_error(
        run("serve", "--run-dir", served_run, "--device", "nonsense"), "--device nonsense"
    )
    busy = __import__("socket").socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        port = busy.getsockname()[1]
        assert_one_line_error(
            run("serve", "--run-dir", served_run, "--port", port),
            f"cannot listen on 127.0.0.1:{port}",
        )
    finally:
        busy.close()
