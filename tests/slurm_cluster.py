"""A real one-node SLURM cluster on this host for the tests: munged, slurmctld and slurmd started from
a generated slurm.conf in a temporary folder, torn down (by pid) afterwards. Needs root; installs
Debian's slurm-wlm and munge with apt when they are missing."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")


def ensure_installed(commands=("slurmctld", "munged"), packages=PACKAGES) -> None:
    """apt-get install `packages` unless every one of `commands` is already on PATH."""
    if all(shutil.which(c) for c in commands):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *packages], check=True, env=env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    def __init__(self, root: Path, cpus: int = 2):
        self.root, self.cpus = root, cpus
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.pids: list[int] = []

    @property
    def env(self) -> dict:
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self) -> "LocalSlurm":
        ensure_installed()
        self._start_munge()
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"""ClusterName=moretest
SlurmctldHost={self.host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldLogFile={self.root}/slurmctld.log
SlurmdLogFile={self.root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
MinJobAge=600
NodeName={self.host} CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([daemon, "-f", str(self.conf)], check=True, env=self.env)
            self.pids.append(self._wait_pid(self.root / f"{daemon}.pid"))
        deadline = time.monotonic() + 60
        while "idle" not in self.run("sinfo", "-h", "-o", "%t", check=False).stdout:
            if time.monotonic() > deadline:
                raise RuntimeError(f"SLURM node never became idle:\n{self.logs()}")
            time.sleep(0.5)
        return self

    def _wait_pid(self, path: Path) -> int:
        deadline = time.monotonic() + 30  # daemons write the pid file after forking
        while not (path.is_file() and path.read_text().strip()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{path} never appeared:\n{self.logs()}")
            time.sleep(0.2)
        return int(path.read_text())

    def _start_munge(self) -> None:
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
            return
        if not Path("/etc/munge/munge.key").is_file():
            subprocess.run(["mungekey", "--create"], check=True)
            shutil.chown("/etc/munge/munge.key", "munge", "munge")
        Path("/run/munge").mkdir(exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
        self._munged = True

    def run(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=kw.pop("env", self.env), capture_output=True, text=True, check=check, **kw)

    def job_field(self, job_id: str, field: str) -> str:
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        for token in out.split():
            if token.startswith(f"{field}="):
                return token.split("=", 1)[1]
        return ""

    def wait_job(self, job_id: str, timeout: float) -> str:
        """Wait until the job reaches a final state; returns it (COMPLETED, FAILED, ...)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_field(job_id, "JobState")
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return state
            if self.job_field(job_id, "Reason") == "DependencyNeverSatisfied":
                return "DependencyNeverSatisfied"
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still {self.job_field(job_id, 'JobState')} after {timeout} s\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in self.root.glob("*.log"))

    def stop(self) -> None:
        for pid in reversed(self.pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if getattr(self, "_munged", False):
            subprocess.run(["pkill", "-x", "munged"], check=False)
