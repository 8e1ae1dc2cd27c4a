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


BRIDGE, SUBNET = "brmore", "10.200.0"  # the test's own hosts: node1 = .11, node2 = .12, controller = .1
NODE_IFNAME = "eth0"  # the veth end inside each node's namespace (GLOO_SOCKET_IFNAME for jobs)


class LocalSlurm:
    """nodes=0: one node, this host, `cpus` CPUs. nodes=N: N emulated nodes (node1..), each a slurmd in its
    own network namespace (address on a bridge) and UTS namespace (own host name), declaring `cpus` CPUs
    each (they share this host's cores: 2 x 2 tasks oversubscribe 2 cores, slow but real)."""

    def __init__(self, root: Path, cpus: int = 2, nodes: int = 0):
        self.root, self.cpus, self.nodes = root, cpus, nodes
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.pids: list[int] = []
        self._hosts_backup: str | None = None

    @property
    def env(self) -> dict:
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self) -> "LocalSlurm":
        ensure_installed()
        self._start_munge()
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        if self.nodes:
            self._make_network()
        controller = f"{self.host}({SUBNET}.1)" if self.nodes else self.host
        suffix = "-%n" if self.nodes else ""
        node_lines = "\n".join(f"NodeName=node{i} NodeAddr={SUBNET}.{10 + i} CPUs={self.cpus} State=UNKNOWN"
                               for i in range(1, self.nodes + 1)) if self.nodes else \
            f"NodeName={self.host} CPUs={self.cpus} State=UNKNOWN"
        self.conf.write_text(f"""ClusterName=moretest
SlurmctldHost={controller}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool{suffix}
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd{suffix}.pid
SlurmctldLogFile={self.root}/slurmctld.log
SlurmdLogFile={self.root}/slurmd{suffix}.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
MinJobAge=600
{node_lines}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True, env=self.env)
        self.pids.append(self._wait_pid(self.root / "slurmctld.pid"))
        if not self.nodes:
            subprocess.run(["slurmd", "-f", str(self.conf)], check=True, env=self.env)
            self.pids.append(self._wait_pid(self.root / "slurmd.pid"))
        for i in range(1, self.nodes + 1):
            # nsenter, not `ip netns exec`: the latter remounts /sys and slurmd then finds no cgroup fs
            for sub in ("spool-",):
                (self.root / f"{sub}node{i}").mkdir(exist_ok=True)
            subprocess.run(["nsenter", f"--net=/run/netns/node{i}", "unshare", "--uts", "sh", "-c",
                            f"hostname node{i}; exec slurmd -f {self.conf} -N node{i}"], check=True, env=self.env)
            self.pids.append(self._wait_pid(self.root / f"slurmd-node{i}.pid"))
        deadline = time.monotonic() + 60
        while self.run("sinfo", "-h", "-o", "%t", check=False).stdout.split() != ["idle"]:
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

    def _make_network(self) -> None:
        def ip(*args: str) -> None:
            subprocess.run(["ip", *args], check=True)

        ip("link", "add", BRIDGE, "type", "bridge")
        ip("addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
        ip("link", "set", BRIDGE, "up")
        hosts = Path("/etc/hosts")
        self._hosts_backup = hosts.read_text()
        lines = [f"{SUBNET}.{10 + i} node{i}" for i in range(1, self.nodes + 1)]
        hosts.write_text(self._hosts_backup + "\n".join(lines) + "\n")
        for i in range(1, self.nodes + 1):
            ns, outside = f"node{i}", f"vmore{i}"
            ip("netns", "add", ns)
            ip("link", "add", outside, "type", "veth", "peer", "name", NODE_IFNAME, "netns", ns)
            ip("link", "set", outside, "master", BRIDGE)
            ip("link", "set", outside, "up")
            ip("-n", ns, "addr", "add", f"{SUBNET}.{10 + i}/24", "dev", NODE_IFNAME)
            ip("-n", ns, "link", "set", NODE_IFNAME, "up")
            ip("-n", ns, "link", "set", "lo", "up")

    def stop(self) -> None:
        for pid in reversed(self.pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if self.nodes:
            time.sleep(1)
            for i in range(1, self.nodes + 1):
                subprocess.run(["ip", "netns", "del", f"node{i}"], check=False)
                subprocess.run(["ip", "link", "del", f"vmore{i}"], check=False, capture_output=True)
            subprocess.run(["ip", "link", "del", BRIDGE], check=False)
            if self._hosts_backup is not None:
                Path("/etc/hosts").write_text(self._hosts_backup)
        if getattr(self, "_munged", False):
            subprocess.run(["pkill", "-x", "munged"], check=False)
