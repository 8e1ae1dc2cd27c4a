"""slurm/pretrain.sh against a real SLURM cluster started on this host (slurmctld + slurmd + munged)."""

import json
import os
import re
import subprocess
import sys
import time

import pytest
from conftest import ROOT, tiny_overrides
from slurm_cluster import NODE_IFNAME, LocalSlurm, ensure_installed

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or sys.platform != "linux",
                                reason="a local SLURM cluster needs root on Linux")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    slurm = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    yield slurm
    slurm.stop()


def _overrides(shards, out):
    return [o for o in tiny_overrides(shards, out) if not o.startswith("output_dir=")]  # OUTPUT_DIR sets it


def _submit(cluster, out, overrides, *sbatch_args, tasks_per_node=2, **env_extra):
    env = dict(cluster.env, CONFIG="configs/tiny-cpu.yaml", OUTPUT_DIR=str(out), PYTHON=sys.executable,
               OVERRIDES=" ".join(overrides), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **env_extra)
    log = out.parent / f"{out.name}.log"
    result = cluster.run("sbatch", "--parsable", f"--ntasks-per-node={tasks_per_node}", "--gres=none",
                         "--cpus-per-task=1", "--time=20", f"--chdir={ROOT}", f"--output={log}", f"--error={log}",
                         *sbatch_args, str(ROOT / "slurm" / "pretrain.sh"), env=env)
    return result.stdout.strip().split(";")[0], log


def test_sbatch_pretrain_trains_two_ranks_and_checkpoints(cluster, shards, tmp_path):
    out = tmp_path / "run"
    job, log = _submit(cluster, out, _overrides(shards, out) + ["train.steps=6", "train.warmup_steps=1"])
    assert cluster.wait_job(job, timeout=300) == "COMPLETED", log.read_text()[-4000:]
    text = log.read_text()
    assert "0: rank 0/2" in text and "1: rank 1/2" in text  # srun --label: both tasks ran and rendezvoused
    assert "0: done: step 6" in text
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert cluster.job_field(job, "ExitCode") == "0:0"


def test_deepspeed_launcher_path(cluster, shards, tmp_path):
    """LAUNCHER=deepspeed: DeepSpeed's runner with a hostfile made from the allocation, srun underneath."""
    out = tmp_path / "run"
    job, log = _submit(cluster, out, _overrides(shards, out) + ["train.steps=3", "train.warmup_steps=1"],
                       LAUNCHER="deepspeed")
    assert cluster.wait_job(job, timeout=300) == "COMPLETED", log.read_text()[-4000:]
    assert (out / f"hostfile-{job}").read_text() == f"{cluster.host} slots=2\n"
    text = log.read_text()
    assert "rank 0/2" in text and "rank 1/2" in text and "done: step 3" in text


def test_usr1_checkpoints_requeues_and_finishes(cluster, shards, tmp_path):
    out = tmp_path / "run"
    job, log = _submit(cluster, out, _overrides(shards, out) + [
        "train.steps=40", "train.warmup_steps=1", "train.save_every=1000", "train.log_every=1"])
    deadline = time.monotonic() + 240
    while not ((out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline, f"training did not start\n{log.read_text()[-3000:] if log.exists() else ''}"
        time.sleep(0.5)
    cluster.run("scancel", "--signal=USR1", job)  # what --signal=USR1@120 does before the time limit
    # the job passes through transient states while it is requeued: poll for a final state only once
    # the second run is visibly running. SLURM holds a requeued job for the credential lifetime
    # (cred_expire, 10 s in this cluster); forcing an earlier start races the revoked credential.
    deadline = time.monotonic() + 300
    while f"job {job} (restart 1)" not in log.read_text():
        assert time.monotonic() < deadline, f"job was not requeued and restarted\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    assert cluster.wait_job(job, timeout=400) == "COMPLETED", log.read_text()[-4000:]
    text = log.read_text()
    stopped = int(text.split("preempted: checkpoint at step ")[1].split(",")[0])
    assert 3 <= stopped < 40
    assert f"requeueing job {job}" in text and f"job {job} (restart 1)" in text
    assert f"start step {stopped} of 40" in text and "0: done: step 40" in text
    assert cluster.job_field(job, "Restarts") == "1"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))  # every step logged once: resumed where it stopped


def test_scripts_pass_shellcheck():
    ensure_installed(("shellcheck",), ("shellcheck",))
    scripts = sorted(str(p) for folder in ("slurm", "benchmarks") for p in (ROOT / folder).glob("*.sh"))
    result = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
    assert len(scripts) == 5 and result.returncode == 0, result.stdout


def test_build_shards_job_array_equals_single_process_build(cluster, raw_root, shards, tmp_path):
    """2-task array + merge job vs the fixture's single-process build with the same options: same bytes."""
    out = tmp_path / "array"
    env = dict(cluster.env, ROOT=str(raw_root), OUT=str(out), PYTHON=sys.executable, PYTHONPATH=str(ROOT), LOG_DIR=str(tmp_path),
               WORKERS="1", BUILD_ARGS="--short-side 80 --samples-per-shard 16 --tokenizer-vocab 600")
    array = cluster.run("sbatch", "--parsable", "--array=0-1", "--cpus-per-task=1", f"--chdir={ROOT}",
                        f"--output={tmp_path}/array-%a.out", f"--error={tmp_path}/array-%a.out",
                        str(ROOT / "slurm" / "build_shards.sh"), env=env)
    array_id = array.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 120
    while not (tmp_path / "array-0.out").is_file() or "merge job" not in (tmp_path / "array-0.out").read_text():
        assert time.monotonic() < deadline, "task 0 did not submit the merge job"
        time.sleep(0.5)
    merge_id = re.search(r"merge job (\d+)", (tmp_path / "array-0.out").read_text()).group(1)
    assert cluster.wait_job(merge_id, timeout=400) == "COMPLETED", (tmp_path / "array-0.out").read_text()
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("array-*.out")))
    assert "part 0 of 2" in logs and "part 1 of 2" in logs and array_id
    single = sorted(p.relative_to(shards) for p in shards.rglob("*") if p.is_file() and "parts" not in p.parts)
    built = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and "parts" not in p.parts)
    assert built == single and any(p.suffix == ".tar" for p in single)
    for rel in single:
        assert (out / rel).read_bytes() == (shards / rel).read_bytes(), rel


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    slurm = LocalSlurm(tmp_path_factory.mktemp("slurm2"), nodes=2).start()
    yield slurm
    slurm.stop()


def test_two_nodes_two_tasks_each(two_nodes, shards, tmp_path):
    """node1 and node2: separate hosts (network + UTS namespaces), two ranks each (local ranks 0 and 1 on
    both), gloo across the bridge; the four ranks rendezvous, train and checkpoint."""
    out = tmp_path / "run"
    job, log = _submit(two_nodes, out, _overrides(shards, out) + ["train.steps=4", "train.warmup_steps=1"],
                       "--nodes=2", tasks_per_node=2, GLOO_SOCKET_IFNAME=NODE_IFNAME)
    assert two_nodes.wait_job(job, timeout=420) == "COMPLETED", log.read_text()[-4000:]
    text = log.read_text()
    assert "on node[1-2]: 4 tasks, master node1:" in text
    for rank, node, local in ((0, 1, 0), (1, 1, 1), (2, 2, 0), (3, 2, 1)):
        assert f"{rank}: rank {rank}/4 on node{node} (local rank {local})" in text, text[-3000:]
    assert "0: more_scale world 4 | global batch 16 = micro 4 x accum 1 x dp 4" in text
    assert "0: done: step 4" in text
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"
