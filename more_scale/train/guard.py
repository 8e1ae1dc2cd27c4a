"""One run per output folder, and no rank outliving its launcher.

RunLock: rank 0 holds `output_dir/run.lock` (host, pid, SLURM job, start time) for the run and touches it
every HEARTBEAT_S. A second run on the same folder is refused, naming the holder, unless the lock is
stale: its process is gone (same host), it belongs to this same SLURM job (a requeue), or it has not
been touched for STALE_AFTER_S (a host that died).

watch_parent: when started by a launcher (torchrun, deepspeed, srun), a rank whose parent died
(`kill -9` of the launcher leaves ranks adopted by init) exits within a few seconds instead of
training on and writing checkpoints beside a restarted run.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # well beyond a heartbeat, short enough for a requeue after a node failure
TAKEOVER = ".takeover"  # beside the lock: created exclusively by the one process replacing a stale lock
STALE_TAKEOVER_S = 60.0  # a takeover takes milliseconds; a guard older than this was left by a dead contender
PARENT_POLL_S = 2.0
EXIT_ORPHANED = 70  # EX_SOFTWARE: the launcher is gone


class RunLocked(RuntimeError):
    """Another live run holds the output folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / "run.lock"
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID", ""),
                   "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._stop = threading.Event()

    def _stale_reason(self, holder: dict) -> str | None:
        if holder.get("host") == self.me["host"] and not _alive(int(holder.get("pid", 0))):
            return f"its process {holder.get('pid')} is gone"
        if holder.get("slurm_job") and holder.get("slurm_job") == self.me["slurm_job"]:
            return f"it belongs to this SLURM job {holder['slurm_job']} (requeued)"
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "it is gone"
        if age > STALE_AFTER_S:
            return f"it was last touched {age:.0f} s ago (> {STALE_AFTER_S:.0f} s)"
        return None

    def acquire(self, warn=print) -> None:
        """Hold the lock or raise RunLocked naming the holder. Atomic both ways: a new lock appears whole (a
        hard link of a complete record: os.link fails when the name exists), and of several processes taking
        over a stale lock one wins (they race on creating TAKEOVER with O_EXCL)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = self.path.with_name(f"{self.path.name}.{self.me['host']}.{self.me['pid']}")
        record.write_text(json.dumps(self.me))
        try:
            for _ in range(2):
                try:
                    os.link(record, self.path)
                    break
                except FileExistsError:
                    self._take_over_if_stale(record, warn)
                    if self._held():
                        break
            else:
                raise RunLocked(f"{self.path}: could not take the lock")
        finally:
            record.unlink(missing_ok=True)
        threading.Thread(target=self._heartbeat, daemon=True, name="run-lock-heartbeat").start()

    def _holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _held(self) -> bool:
        return self._holder() == self.me

    def _take_over_if_stale(self, record: Path, warn) -> None:
        guard = self.path.with_name(self.path.name + TAKEOVER)
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):  # the other contender may just have finished
                if time.time() - guard.stat().st_mtime > STALE_TAKEOVER_S:  # a contender that died mid-takeover
                    guard.unlink(missing_ok=True)
            raise RunLocked(f"{self.path.parent}: another process is taking over its stale lock") from None
        try:
            holder = self._holder()  # read again under the guard: another contender may have taken it already
            reason = self._stale_reason(holder) if self.path.exists() else "it is gone"
            if reason is None:
                raise RunLocked(
                    f"{self.path.parent} is in use by another run: pid {holder.get('pid', '?')} on host "
                    f"{holder.get('host', '?')}{', SLURM job ' + holder['slurm_job'] if holder.get('slurm_job') else ''}"
                    f" since {holder.get('since', '?')} ({self.path}). Use another output_dir, or stop that run; "
                    f"if it is gone, delete {self.path}.")
            warn(f"taking over {self.path}: {reason}")
            replacement = record.with_name(record.name + ".new")
            replacement.write_text(json.dumps(self.me))
            os.replace(replacement, self.path)
        finally:
            os.close(fd)
            guard.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        try:
            if json.loads(self.path.read_text()).get("pid") == self.me["pid"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass


def launched() -> bool:
    """Started by a launcher (it set RANK, or SLURM's srun started this task)."""
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ


def watch_parent(on_orphaned=None) -> None:
    """Exit (EXIT_ORPHANED) a few seconds after this process's parent dies; `on_orphaned` runs first."""
    parent = os.getppid()

    def poll() -> None:
        while True:
            time.sleep(PARENT_POLL_S)
            if os.getppid() != parent:
                print(f"rank pid {os.getpid()}: its launcher (pid {parent}) is gone; exiting", file=sys.stderr, flush=True)
                if on_orphaned is not None:
                    on_orphaned()
                os._exit(EXIT_ORPHANED)

    threading.Thread(target=poll, daemon=True, name="parent-watch").start()
