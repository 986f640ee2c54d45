"""Run benchmark runs as subprocesses, a bounded number at once (benchmarks/results.py and
benchmarks/ranking.py grids: each run is its own process, so one crash loses only that run)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

OnExit = Callable[[str, int, float], None]  # (name, return code, seconds)


def run_at_most(
    runs: Iterable[tuple[str, list[str], Path]], jobs: int, on_exit: OnExit | None = None
) -> None:
    """Run each ``(name, command, log)``, at most ``jobs`` at once, stdout and stderr appended
    to ``log``; ``on_exit`` is called as each one ends. Returns when all have ended."""
    pending = list(runs)
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    while pending or running:
        while pending and len(running) < jobs:
            name, command, log_path = pending.pop(0)
            with open(log_path, "ab") as log:  # the child keeps its own copy of the handle
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            running[name] = (process, time.time())
        time.sleep(2)
        for name, (process, started) in list(running.items()):
            if process.poll() is None:
                continue
            del running[name]
            if on_exit is not None:
                on_exit(name, process.returncode, time.time() - started)
