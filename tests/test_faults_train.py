"""Fault suite, training: real 2-rank runs (torchrun, gloo) with faults injected from outside. Nothing
ends as a false success, nothing hangs, no checkpoint that resume would pick is ever half-written.
Each case is recorded for docs/RELIABILITY.md (tests/reliability_report.py)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, launcher, tiny_overrides
from faults import record

from more_scale.train.checkpoint import problem_with

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _command(shards: Path, out: Path, *overrides: str, ranks: int = 2) -> list[str]:
    return [launcher("torchrun"), "--nproc_per_node", str(ranks), "--master_port", _port(), "launch/train.py",
            "--config", "tiny-cpu", *tiny_overrides(shards, out), "data.augment=false", "train.warmup_steps=2", *overrides]


def _run(command: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def _single(shards: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    """One process, no launcher: enough for the checks that must fail before a process group exists."""
    return _run([sys.executable, "launch/train.py", "--config", "tiny-cpu", *tiny_overrides(shards, out),
                 "train.warmup_steps=1", *overrides])


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _wait_for_steps(out: Path, proc: subprocess.Popen, n: int, limit: float = 180) -> None:
    deadline = time.monotonic() + limit
    while len(_metrics(out)) < n:
        assert proc.poll() is None, f"training ended early\n{proc.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)


def _latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


def test_a_diverged_run_exits_non_zero_and_saves_nothing_after_it(shards, tmp_path):
    out = tmp_path / "run"
    result = _run(_command(shards, out, "train.lr=1e6", "train.steps=20", "train.log_every=1", "train.save_every=1"))
    log = result.stdout + result.stderr
    finite = [m["step"] for m in _metrics(out) if math.isfinite(m["loss"])]
    says = re.search(r"training diverged at step \d+: .* last logged loss terms: loss \S+, loss/text_cxr \S+", log) is not None
    record("train", "train.lr=1e6: the loss turns NaN within a few steps",
           "non-zero exit; the message names the step and the loss terms; latest is the last finite step",
           f"{'non-zero' if result.returncode else 'zero'} exit; the message "
           f"{'names' if says else 'does not name'} the step and the loss terms; latest is "
           f"{'the last finite step' if _latest(out) == f'step_{max(finite):08d}' else _latest(out)}")


def test_killing_the_launcher_ends_the_ranks_and_a_second_run_is_refused(shards, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_command(shards, out, "train.steps=2000", "train.log_every=1", "train.save_every=5"),
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_steps(out, proc, 6)
        ranks = psutil.Process(proc.pid).children()
        holder = json.loads((out / "run.lock").read_text())
        second = _single(shards, out, "train.steps=5")
        refused = f"is in use by another run: pid {holder['pid']} on host {socket.gethostname()}" in second.stderr
        record("train", "a second run on the same output_dir while the first is alive",
               "refused with exit 2, naming the holder's pid and host",
               f"{'refused' if refused else 'not refused'} with exit {second.returncode}, naming the holder's pid and host")
        os.kill(proc.pid, signal.SIGKILL)  # the launcher only: its ranks are orphaned
        start = time.monotonic()
        while any(r.is_running() and r.status() != psutil.STATUS_ZOMBIE for r in ranks) and time.monotonic() - start < 60:
            time.sleep(0.2)
        gone = time.monotonic() - start
    finally:
        for p in psutil.Process(proc.pid).children(recursive=True) if psutil.pid_exists(proc.pid) else []:
            p.kill()
        proc.kill()
        proc.communicate()
    record("train", "kill -9 of the torchrun launcher mid-run", "both ranks gone within 30 s",
           "both ranks gone within 30 s" if gone < 30 else f"ranks alive {gone:.0f} s after the kill")
    released = not (out / "run.lock").exists()
    resumed = _run(_command(shards, out, "train.steps=2000", "train.resume=auto",
                            f"train.stop_at_step={int(_latest(out).removeprefix('step_')) + 2}"))
    log = resumed.stdout + resumed.stderr
    record("train", "restart on that output_dir after the launcher was killed",
           "the orphaned ranks released the lock; the restart resumes from the latest checkpoint",
           f"the orphaned ranks {'released' if released else 'left'} the lock; the restart "
           f"{'resumes from the latest checkpoint' if resumed.returncode == 0 and 'start step' in log else 'fails'}")


def test_killing_one_rank_ends_the_job(shards, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_command(shards, out, "train.steps=2000", "train.log_every=1", "train.save_every=1000"),
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_steps(out, proc, 3)
        os.kill(psutil.Process(proc.pid).children()[1].pid, signal.SIGKILL)
        start = time.monotonic()
        code = proc.wait(timeout=120)
        ended = time.monotonic() - start
    finally:
        proc.kill()
        proc.communicate()
    record("train", "kill -9 of one rank mid-run", "the job ends within 30 s with a non-zero exit",
           f"the job ends within {'30 s' if ended < 30 else f'{ended:.0f} s'} with a {'non-zero' if code else 'zero'} exit")


def test_a_wedged_rank_ends_the_job(shards, tmp_path):
    """SIGSTOP on one rank after step 3: the other waits either inside DeepSpeed's gradient all-reduce (on CPU
    its shared-memory op, which no process-group timeout bounds) until its step watchdog ends it, or in gloo's
    all-reduce of the preemption flag until gloo's timeout does; the launcher then ends the stopped one
    (SIGTERM, then SIGKILL after its grace period)."""
    import threading

    out = tmp_path / "run"
    proc = subprocess.Popen(_command(shards, out, "train.steps=2000", "train.log_every=1000", "train.save_every=1000",
                                     "train.sync_audit_steps=1", "train.collective_timeout_s=20"),
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    stopped = None
    try:
        deadline = time.monotonic() + 180
        while not any("host-device syncs per step" in line for line in lines):  # printed after step 3
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.1)
        stopped = psutil.Process(proc.pid).children()[1]
        stopped.send_signal(signal.SIGSTOP)
        start = time.monotonic()
        code = proc.wait(timeout=150)
        ended = time.monotonic() - start
    finally:
        if stopped is not None and stopped.is_running():
            stopped.kill()
        proc.kill()
        reader.join(10)
    log = "".join(lines)
    # whichever waits first names the 20 s: the step watchdog (inside DeepSpeed's all-reduce) or gloo's own
    # timeout (the preemption flag's all-reduce, each step)
    said = "no training step finished in 20 s" in log or "Timed out waiting 20000ms" in log
    record("train", "SIGSTOP of one rank mid-run (train.collective_timeout_s=20)",
           "the job ends within 90 s with a non-zero exit, naming the 20 s timeout",
           f"the job ends within {'90 s' if ended < 90 else f'{ended:.0f} s'} with a {'non-zero' if code else 'zero'} "
           f"exit, {'naming' if said else 'not naming'} the 20 s timeout")


def test_sigterm_during_a_save_leaves_the_previous_checkpoint_whole(shards, tmp_path):
    out = tmp_path / "run"
    root = out / "checkpoints"
    proc = subprocess.Popen(_command(shards, out, "train.steps=2000", "train.log_every=1", "train.save_every=1",
                                     "train.keep_checkpoints=2"),
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    caught = None
    try:
        _wait_for_steps(out, proc, 2)
        deadline = time.monotonic() + 60
        while caught is None and time.monotonic() < deadline:
            partial = [e.name for e in os.scandir(root) if e.name.endswith(".partial")] if root.is_dir() else []
            if partial and any(True for _ in os.scandir(root / partial[0])):  # files are being written now
                for rank in psutil.Process(proc.pid).children():
                    rank.send_signal(signal.SIGTERM)
                caught = partial[0]
            time.sleep(0.0005)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.communicate()
    assert caught, "no save was caught in the act"
    latest_whole = problem_with(root / _latest(out)) is None
    left = (root / caught).exists()
    record("checkpoint", "SIGTERM to both ranks while they write a checkpoint",
           "latest names a whole checkpoint; the half-written one stays a .partial folder",
           f"latest names {'a whole' if latest_whole else 'a broken'} checkpoint; the half-written one "
           f"{'stays a .partial folder' if left else 'is gone'}")
    step = int(_latest(out).removeprefix("step_"))
    resumed = _run(_command(shards, out, "train.steps=2000", "train.resume=auto", f"train.stop_at_step={step + 1}"))
    log = resumed.stdout + resumed.stderr
    record("checkpoint", "restart after that",
           "the .partial folder is removed and training resumes from latest",
           f"the .partial folder is {'removed' if not (root / caught).exists() and 'never finished' in log else 'kept'} "
           f"and training {'resumes from latest' if f'start step {step} of' in log and resumed.returncode == 0 else 'fails'}")


@pytest.fixture(scope="module")
def three_checkpoints(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("three") / "run"
    result = _run(_command(shards, out, "train.steps=6", "train.save_every=2", "train.keep_checkpoints=3"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _resume_copy(shards, source: Path, tmp_path: Path, damage) -> tuple[subprocess.CompletedProcess, str]:
    out = tmp_path / "run"
    shutil.copytree(source, out)
    damage(out / "checkpoints")
    result = _run(_command(shards, out, "train.steps=6", "train.save_every=2", "train.resume=auto",
                           "train.stop_at_step=6", "train.keep_checkpoints=3"))
    return result, result.stdout + result.stderr


def test_a_truncated_file_in_the_latest_checkpoint_falls_back(shards, three_checkpoints, tmp_path):
    def truncate(root):
        f = next((root / "step_00000006").glob("*optim_states.pt"))
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    result, log = _resume_copy(shards, three_checkpoints, tmp_path, truncate)
    record("checkpoint", "a checkpoint file truncated in the latest tag",
           "a warning names the file; training resumes from the previous tag (step 4)",
           f"a warning {'names the file' if 'optim_states.pt is not a complete checkpoint file' in log else 'is missing'}; "
           "training " + ("resumes from the previous tag (step 4)" if "start step 4 of" in log and not result.returncode
                          else "fails"))


def test_an_empty_latest_file_falls_back_to_the_newest_good_tag(shards, three_checkpoints, tmp_path):
    result, log = _resume_copy(shards, three_checkpoints, tmp_path, lambda root: (root / "latest").write_text(""))
    record("checkpoint", "an empty `latest` file", "a warning; training resumes from the newest good tag (step 6)",
           f"{'a warning' if 'which is not a checkpoint here' in log else 'no warning'}; training "
           f"{'resumes from the newest good tag (step 6)' if 'start step 6 of' in log and result.returncode == 0 else 'fails'}")


def _how_it_ended(result: subprocess.CompletedProcess, expected: str) -> str:
    """A refused resume as the user sees it: the ranks' own exit code (torchrun's is 1 whenever one fails),
    whether our code printed a traceback, and whether the expected message is there."""
    rank_exit = re.search(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", result.stderr, re.S)
    ours_crashed = re.search(r'File "[^"]*more_scale/', result.stderr)
    return (f"a rank exits {rank_exit.group(1) if rank_exit else result.returncode}"
            f"{' with a traceback' if ours_crashed else ''}: " +
            (f'"{expected}"' if expected in result.stderr else result.stderr[-300:]))


def test_resuming_with_another_model_size_names_the_setting(shards, three_checkpoints, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(three_checkpoints, out)
    result = _run(_command(shards, out, "train.steps=8", "train.resume=auto", "model.cxr.depth=1"))
    expected = "config differs: model.cxr.depth 2 -> 1. 12 parameters do not fit"
    record("checkpoint", "resume with another model size (model.cxr.depth 2 -> 1)",
           f'a rank exits 2: "{expected}"', _how_it_ended(result, expected))


def test_a_checkpoint_with_a_negative_step_is_refused(shards, three_checkpoints, tmp_path):
    import torch

    out = tmp_path / "run"
    shutil.copytree(three_checkpoints, out)
    states = out / "checkpoints" / "step_00000006" / "mp_rank_00_model_states.pt"
    saved = torch.load(states, weights_only=False)  # the test's own file
    saved["train_state"]["step"] = -3
    torch.save(saved, states)
    result = _run(_command(shards, out, "train.steps=8", "train.resume=auto"))
    expected = "train_state.step is -3, expected an integer >= 0"
    record("checkpoint", "a checkpoint whose TrainState says step -3", f'a rank exits 2: "{expected}"',
           _how_it_ended(result, expected))


def _tmpfs(path: Path, size: str, *options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join((f"size={size}", *options)), "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_full_disk_fails_before_writing_naming_what_is_needed(shards, tmp_path):
    out = tmp_path / "small"
    if not _tmpfs(out, "8m"):  # one tiny checkpoint is ~4.5 MB: the first fits, a second does not
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        result = _run(_command(shards, out, "train.steps=10", "train.save_every=2", "train.keep_checkpoints=1"))
        latest_ok = problem_with(out / "checkpoints" / _latest(out)) is None
    finally:
        subprocess.run(["umount", str(out)], check=False)
    says = "no space left on device for a checkpoint" in result.stderr and "need" in result.stderr and "free" in result.stderr
    record("checkpoint", "the output filesystem fills up (8 MB tmpfs)",
           "non-zero exit; no space left on device ... need X, have Y free, before writing; latest stays whole",
           f"{'non-zero' if result.returncode else 'zero'} exit; "
           f"{'no space left on device ... need X, have Y free' if says else 'another message'}, before writing; "
           f"latest {'stays whole' if latest_ok else 'is broken'}")


def test_a_read_only_output_is_refused_before_training(shards, tmp_path):
    out = tmp_path / "ro"
    if not _tmpfs(out, "1m", "ro"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        result = _single(shards, out / "run", "train.steps=2")
    finally:
        subprocess.run(["umount", str(out)], check=False)
    record("inputs", "output_dir on a read-only filesystem", "exit 2: output_dir ... is not writable",
           f"exit {result.returncode}: "
           + ("output_dir ... is not writable" if "is not writable" in result.stderr else result.stderr[-200:]))


def test_a_shard_deleted_mid_run_is_counted_and_replaced(shards, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(shards, data)
    out = tmp_path / "run"
    proc = subprocess.Popen(_command(data, out, "train.steps=40", "train.log_every=2", "train.save_every=1000",
                                     "data.max_skip_rate=0.9", "data.workers=0"),
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_steps(out, proc, 2)
        victim = sorted((data / "train").glob("*.tar"))[0]
        victim.unlink()
        log = proc.communicate(timeout=240)[0]
    finally:
        proc.kill()
    skipped = _metrics(out)[-1]["skipped"] if _metrics(out) else 0
    record("train", "a training shard deleted mid-run (data.max_skip_rate=0.9)",
           "the run completes; reads of the deleted shard are counted and served by stand-ins",
           f"the run {'completes' if proc.returncode == 0 and 'done: step 40' in log else 'fails'}; reads of the deleted "
           f"shard are {'counted' if skipped > 0 and victim.name in log else 'not counted'} and served by stand-ins")


INPUT_CASES = [  # (fault, overrides, expected message)
    ("data.train names a missing folder", ["data.train=/nonexistent/train"], "data.train: no such folder /nonexistent/train"),
    ("a micro-batch larger than the training split", ["data.batch_size=100000"],
     "data.batch_size (100000) is larger than the {n} training samples"),
    ("an unknown config key", ["train.stepz=3"], "unknown key train.stepz"),
]


@pytest.mark.parametrize("fault, overrides, expected", INPUT_CASES, ids=["missing", "batch", "key"])
def test_bad_inputs_fail_before_any_model_is_built(shards, tmp_path, fault, overrides, expected):
    from more_scale.data.build import read_index

    expected = expected.format(n=read_index(shards / "train")["samples"])
    result = _single(shards, tmp_path / "run", *overrides)
    before = "trainable" not in result.stdout  # the start-up banner is printed after the model and engine exist
    record("inputs", fault, f"exit 2, before any model: {expected}",
           f"exit {result.returncode}, {'before' if before else 'after'} any model: "
           f"{expected if expected in result.stderr else result.stderr.strip()[-200:]}")


def test_corrupt_bytes_in_a_shard_are_caught_by_verify_shards(shards, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(shards, data)
    victim = sorted((data / "train").glob("*.tar"))[0]
    raw = bytearray(victim.read_bytes())
    raw[2000:2008] = b"\x00CORRUPT"  # same length: the index's size check passes
    victim.write_bytes(bytes(raw))
    result = _single(data, tmp_path / "run", "data.verify_shards=true")
    expected = f"data.verify_shards: {victim} does not match the sha256 in shards.json"
    record("inputs", "a few corrupt bytes inside a shard, data.verify_shards=true", f"exit 2: {expected}",
           f"exit {result.returncode}: {expected if expected in result.stderr else result.stderr.strip()[-200:]}")


def test_run_lock_takeover_rules(tmp_path, monkeypatch):
    """A lock whose process is gone (same host), or that belongs to this SLURM job, is taken over."""
    from more_scale.train.guard import RunLock, RunLocked

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "slurm_job": ""}))
    warnings = []
    lock = RunLock(tmp_path)
    lock.acquire(warn=warnings.append)
    assert warnings == [f"taking over {tmp_path / 'run.lock'}: its process {dead.pid} is gone"]
    with pytest.raises(RunLocked, match=f"is in use by another run: pid {os.getpid()} on host"):
        RunLock(tmp_path).acquire()  # the same process holds it: alive
    lock.release()
    assert not (tmp_path / "run.lock").exists()
    (tmp_path / "run.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "slurm_job": "42"}))
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    RunLock(tmp_path).acquire(warn=warnings.append)
    assert warnings[-1].endswith("it belongs to this SLURM job 42 (requeued)")
