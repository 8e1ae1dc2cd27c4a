"""Soak: 2 CPU ranks train the tiny config for N minutes while faults are injected at random; after each
the run is restarted with train.resume=auto, as SLURM's requeue would. Reports steps done, faults by kind,
recoveries, checkpoint integrity after every fault, and samples lost: training-stream positions never
trained on (a resume must continue at the checkpoint's position) and unreadable reads outside the shards
corrupted on purpose. Writes benchmarks/results/soak_cpu.md|json.

  python benchmarks/soak.py --minutes 10 [--seed 0]

Faults: kill -9 of one rank; SIGTERM to both ranks (often mid-save: saves run every step or two);
SIGUSR1 (preemption: checkpoint, exit 75); SIGSTOP of one rank (wedged: the step watchdog or gloo's
timeout ends the job after train.collective_timeout_s=20); a few corrupt bytes inside a sample of a random
shard (a hit in a tar header would make start-up refuse the shard set, the fault suite's case), and a
shard whose first samples are replaced by bad ones of every decoding class the fault suite knows (a JPEG
claiming 65000 x 65000 pixels, a deeply nested meta.json, structured and complex ECG arrays): deliberate,
those samples are lost and counted; a full disk (a filler file leaves less room than a checkpoint needs;
removed after the run fails). The output folder lives on its own tmpfs so the disk can be filled.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil
import webdataset as wds
from common import write

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from faults import BAD_SAMPLES  # noqa: E402

from more_scale.data.build import INDEX_NAME, write_tar  # noqa: E402
from more_scale.train.checkpoint import problem_with  # noqa: E402

FAULTS = ("kill_rank", "sigterm", "preempt", "wedged_rank", "corrupt_shard", "bad_samples", "full_disk")
DATA_FAULTS = ("corrupt_shard", "bad_samples")  # the run goes on: samples skipped and counted
GLOBAL_BATCH = 8  # 2 ranks x micro-batch 4
EXTENSIONS = ROOT / ".cache" / "torch_extensions"  # as the tests and the Makefile


def build_shm_op() -> None:
    """DeepSpeed's CPU shared-memory op compiled before the first round, never inside one a fault may kill."""
    subprocess.run([sys.executable, "-c", "from deepspeed.ops.op_builder import ShareMemCommBuilder; "
                    "ShareMemCommBuilder().load()"], cwd=ROOT, check=True, capture_output=True,
                   env=dict(os.environ, DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(EXTENSIONS)))


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def build_shards(work: Path) -> Path:
    raw, shards = work / "raw", work / "shards"
    python = sys.executable
    subprocess.run([python, "launch/make_synthetic.py", "--out", str(raw), "--subjects", "120", "--image-size", "128",
                    "--workers", "2"], cwd=ROOT, check=True, capture_output=True)
    subprocess.run([python, "launch/build_shards.py", "--source", "mimic", "--root", str(raw), "--out", str(shards),
                    "--short-side", "72", "--samples-per-shard", "16", "--workers", "2", "--tokenizer-vocab", "600"],
                   cwd=ROOT, check=True, capture_output=True)
    return shards


def start(shards: Path, out: Path, log) -> subprocess.Popen:
    # the shm op built once, up front (build_shm_op): a run killed while torch compiles it would leave the build's
    # lock file behind, on which every later start waits (dist.warn_of_stale_build_lock says so)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu",
               TORCH_EXTENSIONS_DIR=str(EXTENSIONS))
    command = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", _port(),
               "launch/train.py", "--config", "tiny-cpu", f"data.train={shards / 'train'}", f"output_dir={out}",
               "data.batch_size=4", "data.workers=1", "data.augment=true", "data.max_skip_rate=0.5",
               "train.steps=1000000", "train.warmup_steps=10", "train.log_every=1", "train.save_every=2",
               "train.keep_checkpoints=2", "train.resume=auto", "train.collective_timeout_s=20"]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def inject(fault: str, proc: subprocess.Popen, shards: Path, out: Path, rng: random.Random, corrupted: set) -> None:
    ranks = psutil.Process(proc.pid).children()
    if fault == "kill_rank":
        os.kill(rng.choice(ranks).pid, signal.SIGKILL)
    elif fault == "sigterm":
        for rank in ranks:
            rank.send_signal(signal.SIGTERM)
    elif fault == "preempt":
        os.kill(rng.choice(ranks).pid, signal.SIGUSR1)
    elif fault == "wedged_rank":
        os.kill(rng.choice(ranks).pid, signal.SIGSTOP)
    elif fault == "bad_samples":
        shard = rng.choice(sorted((shards / "train").glob("*.tar")))
        _replace_first_samples(shard)
        corrupted.add(shard.name)
    elif fault == "corrupt_shard":
        shard = rng.choice(sorted((shards / "train").glob("*.tar")))
        data = bytearray(shard.read_bytes())
        with tarfile.open(shard) as tar:  # inside a member's data: a bad sample (a header hit is refused at start)
            member = rng.choice([m for m in tar.getmembers() if m.size >= 64])
        at = member.offset_data + rng.randrange(0, member.size - 16)
        data[at:at + 16] = bytes(rng.randrange(256) for _ in range(16))
        shard.write_bytes(bytes(data))
        corrupted.add(shard.name)
    elif fault == "full_disk":  # fill to the last byte, then give back 1 MB: less than a checkpoint (~4.5 MB) needs
        with open(out / "filler", "wb") as f:
            size = 0
            try:
                while True:
                    os.posix_fallocate(f.fileno(), size, 1 << 20)
                    size += 1 << 20
            except OSError:
                f.truncate(max(0, size - (1 << 20)))


def _replace_first_samples(shard: Path) -> None:
    """The shard's first samples become the bad samples (same keys, so the shard's count holds), written beside
    it and renamed over it (a reader with the old member table then reads misplaced bytes: skipped too), and
    shards.json updated to match, as if the build had written them: start-up refuses a shard whose size
    differs from its index entry, so an unlisted change would stop every later run instead."""
    samples = [{k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}
               for sample in wds.WebDataset(str(shard), shardshuffle=False, empty_check=False)]
    for i, (members, _) in enumerate(list(BAD_SAMPLES.values())[:len(samples)]):
        samples[i] = {"__key__": samples[i]["__key__"], **members}
    written = write_tar(shard, samples)  # the builder's own writer: temporary name, readability check, rename
    index_path = shard.parent / INDEX_NAME
    index = json.loads(index_path.read_text())
    for entry in index["shards"]:
        if entry["name"] == shard.name:
            entry.update(written)
    index_path.with_suffix(".tmp").write_text(json.dumps(index))
    os.replace(index_path.with_suffix(".tmp"), index_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="more_soak_"))
    out = work / "out"
    out.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(out)], capture_output=True).returncode:
        sys.exit("soak needs root to mount a tmpfs for the output folder (the full-disk fault)")
    shards = build_shards(work)
    build_shm_op()
    faults, outcomes, integrity, corrupted = Counter(), Counter(), [], set()
    gaps = restarts = lost = deliberate = 0
    proc = None
    deadline = time.monotonic() + 60 * args.minutes
    log = open(work / "train.log", "w")
    try:
        while time.monotonic() < deadline:
            latest = out / "checkpoints" / "latest"
            expected_start = int(latest.read_text().strip().removeprefix("step_")) if latest.is_file() else 0
            logged_before = len(metrics(out))
            proc = start(shards, out, log)
            restarts += 1
            started = time.monotonic()  # start-up (imports, rendezvous, engine) varies with the machine's load:
            while (proc.poll() is None and len(metrics(out)) <= logged_before and time.monotonic() < deadline
                   and time.monotonic() - started < 180):  # every round reaches a step before its fault
                time.sleep(0.5)
            wait = rng.uniform(2, 12)
            while proc.poll() is None and wait > 0 and time.monotonic() < deadline:
                time.sleep(0.5)
                wait -= 0.5
            fault = None
            if proc.poll() is None and time.monotonic() < deadline and len(metrics(out)) > logged_before:
                fault = rng.choice(FAULTS)
                faults[fault] += 1
                inject(fault, proc, shards, out, rng, corrupted)
            outcome = None
            if proc.poll() is None:
                try:
                    proc.wait(timeout=90 if fault not in (None, *DATA_FAULTS) else 15)
                except subprocess.TimeoutExpired:  # bad data does not stop the run: end this round
                    outcome = "still training 15 s later, then ended by the soak"
                    os.killpg(proc.pid, signal.SIGTERM)
                    os.killpg(proc.pid, signal.SIGCONT)  # a stopped rank acts on the SIGTERM only once continued
                    proc.wait(timeout=60)
            outcomes[f"{fault or 'end of round'}: {outcome or f'exit {proc.returncode}'}"] += 1
            (out / "filler").unlink(missing_ok=True)
            new = metrics(out)[logged_before:]
            if new:  # the resumed run's first step continues exactly after the checkpoint it loaded
                gaps += int(new[0]["step"] != expected_start + 1 or new[0]["samples"] != (expected_start + 1) * GLOBAL_BATCH)
                skipped = new[-1]["skipped"]  # unreadable reads in this run, all ranks
                if corrupted:
                    deliberate += skipped
                else:
                    lost += skipped
            if latest.is_file():
                problem = problem_with(out / "checkpoints" / latest.read_text().strip())
                integrity.append(problem is None)
    finally:
        log.close()
        final = metrics(out)
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        subprocess.run(["umount", str(out)], check=False)
    rows = [{"what": "minutes", "value": args.minutes},
            {"what": "optimizer steps reached", "value": final[-1]["step"] if final else 0},
            {"what": "restarts (train.resume=auto)", "value": restarts - 1},
            *({"what": f"fault: {k}", "value": v} for k, v in sorted(faults.items())),
            *({"what": f"outcome: {k}", "value": v} for k, v in sorted(outcomes.items())),
            {"what": "checkpoint checks after a run ended (latest whole)", "value": f"{sum(integrity)} of {len(integrity)}"},
            {"what": "resumes that did not continue at the checkpoint's position", "value": gaps},
            {"what": "unreadable reads once a shard was corrupted on purpose (deliberate)", "value": deliberate},
            {"what": "samples lost (unreadable reads before any corruption + position gaps)", "value": lost + gaps}]
    print(write("soak_cpu", rows, f"python benchmarks/soak.py --minutes {args.minutes:g} --seed {args.seed}",
                "2 ranks (torchrun, gloo), tiny config, micro-batch 4, a checkpoint every 2 steps. The output folder is a "
                "64 MB tmpfs. Steps after the last checkpoint are redone after a restart (not lost: the stream resumes at "
                "the checkpoint's position)."))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
