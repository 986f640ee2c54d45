"""The run directory: a stable layout that tools and people can read (see docs/run-dir.md)."""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

from flexgr.atomic import atomic_write_text
from flexgr.train.config import Config, ConfigError, dump_config, load_config


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (exists already, has no checkpoint, ...)."""


class RunDirBusy(RunDirError):
    """Another process holds the run directory's lock; ``pid`` is its process id if known."""

    def __init__(self, message: str, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def model(self) -> Path:
        """Path stem of the exported model: model.safetensors + model.json."""
        return self.root / "model"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    def lock(self) -> RunLock:
        """The run's exclusive lock (creates the directory); RunDirBusy if another process
        holds it. Use as a context manager around training."""
        return RunLock(self.lock_file)

    def create(self, cfg: Config) -> None:
        """Start a new run here; refuse a directory that already holds one. A directory with only
        a config.toml and at most an empty metrics.jsonl (a run that failed before training
        started, e.g. a refused warm start) is reused."""
        logged = self.metrics.exists() and self.metrics.stat().st_size > 0
        if self.last_checkpoint.exists() or logged:
            raise RunDirError(
                f"{self.root} already holds a run; continue it with --resume or pick another --run-dir"
            )
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.write_config(cfg)

    def write_config(self, cfg: Config) -> None:
        atomic_write_text(self.config, dump_config(cfg))

    def read_config(self) -> Config:
        if not self.config.is_file():
            raise RunDirError(f"{self.root} is not a run directory (no config.toml)")
        try:
            return load_config(self.config)
        except ConfigError as err:
            raise RunDirError(str(err)) from None
        except UnicodeDecodeError as err:
            raise RunDirError(
                f"{self.config}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                f"{err.start})"
            ) from None
        except OSError as err:
            raise RunDirError(f"cannot read {self.config}: {err.strerror or err}") from None

    def require_checkpoint(self) -> Path:
        if not self.last_checkpoint.is_file():
            raise RunDirError(
                f"{self.root} has no checkpoint to resume from ({self.last_checkpoint})"
            )
        return self.last_checkpoint

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.is_file():
            return []
        records, number = [], 0
        try:
            with open(self.metrics, encoding="utf-8") as handle:
                for number, line in enumerate(handle, start=1):
                    if line.strip():
                        records.append(json.loads(line))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RunDirError(f"{self.metrics}, line {number}: not a JSON record ({err})") from None
        except OSError as err:
            raise RunDirError(f"cannot read {self.metrics}: {err.strerror or err}") from None
        return records


class RunLock:
    """An exclusive ``flock`` on ``DIR/.lock`` holding the holder's pid.

    The kernel drops the lock when the holder exits, however it exits (kill -9 included), so a
    stale lock file never blocks a later run; only a live holder does. Under torchrun rank 0
    takes it (the other ranks share rank 0's run directory). Re-entrant within a process: the
    CLI and :func:`flexgr.train.fit` may both take it.
    """

    _held: ClassVar[dict[str, list[int]]] = {}  # real path -> [fd, count], this process's locks
    _guard: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, path: Path) -> None:
        self.path = path
        self._key: str | None = None
        self._created: list[Path] = []  # directories acquire() made, outermost first

    def acquire(self) -> None:
        root = self.path.parent
        if root.exists() and not root.is_dir():
            raise RunDirError(f"{root} is not a directory; pick another --run-dir")
        created = _missing_dirs(root)
        root.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.path)
        with self._guard:
            if key in self._held:
                self._held[key][1] += 1
                self._key = key
                return
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    raise
                pid = self.holder()
                who = f"pid {pid}" if pid is not None else "a process that has not written its pid"
                raise RunDirBusy(
                    f"{root} is in use by another flexgr process ({who}); wait for it to "
                    "finish, stop it, or pick another --run-dir",
                    pid,
                ) from None
            # The pid is for messages only; the lock itself is the flock.
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._held[key] = [fd, 1]
            self._key = key
            self._created = created

    def holder(self) -> int | None:
        """The pid written by the lock's holder (None if unreadable or not written yet)."""
        try:
            return int(self.path.read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._key is None:
            return
        with self._guard:
            held = self._held[self._key]
            held[1] -= 1
            if held[1] == 0:
                # The file stays (unlinking it could let two processes lock different inodes),
                # unless this lock created the directory and nothing else was written there: a
                # run that failed before it started leaves no empty directory behind.
                self._remove_if_unused()
                fcntl.flock(held[0], fcntl.LOCK_UN)
                os.close(held[0])
                del self._held[self._key]
        self._key = None

    def _remove_if_unused(self) -> None:
        root = self.path.parent
        if not self._created:
            return
        try:
            if {p.name for p in root.iterdir()} != {self.path.name}:
                return
            self.path.unlink()
            for directory in reversed(self._created):  # deepest first
                directory.rmdir()
        except OSError:
            pass  # best effort: something else appeared meanwhile

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class MetricsLog:
    """Appends one JSON object per line, each with one unbuffered write, so a crash loses at most
    a partial line, and a failed write (a full disk) is cut back off before the error goes on.

    ``size`` is recorded in checkpoints; a resumed run truncates the file back to it, dropping the
    records that the checkpoint's state does not include (they are written again).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Open for the whole run (closed in close()): a with-block per record would reopen it.
            self._handle = open(path, "ab", buffering=0)  # noqa: SIM115
        except OSError as err:
            raise _naming(err, path) from err

    @property
    def size(self) -> int:
        return self._handle.tell()

    def truncate(self, size: int) -> None:
        self._handle.truncate(size)
        self._handle.seek(size)

    def write(self, record: dict[str, Any]) -> None:
        data = memoryview((json.dumps(_finite(record)) + "\n").encode("utf-8"))
        start = self._handle.tell()
        try:
            while data:
                written = self._handle.write(data)
                data = data[written or 0 :]
        except OSError as err:
            try:
                self._handle.truncate(start)
                self._handle.seek(start)
            except OSError:
                pass  # the next resume truncates to the checkpoint's size anyway
            raise _naming(err, self.path) from err

    def sync(self) -> None:
        try:
            os.fsync(self._handle.fileno())
        except OSError as err:
            raise _naming(err, self.path) from err

    def close(self) -> None:
        self._handle.close()


def _missing_dirs(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, outermost first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing[::-1]


def _naming(err: OSError, path: Path) -> OSError:
    """``err`` with ``path`` as its file name (a failed write names none)."""
    if err.filename is not None:
        return err
    return type(err)(err.errno, err.strerror or str(err), str(path))


def _finite(record: dict[str, Any]) -> dict[str, Any]:
    # JSON has no NaN/inf; a diverged loss is written as null rather than invalid JSON.
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }
