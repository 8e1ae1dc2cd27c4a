"""Fault suite, data and run folders: bad samples of every decoding class, every tar header form tar writes,
a shard index that lies, a checkpoint folder that carries code, a rerun over an earlier run, two processes
taking over one stale lock, and config values out of range. Each case is recorded for docs/RELIABILITY.md
(tests/reliability_report.py)."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import webdataset as wds
from conftest import ROOT
from faults import BAD_SAMPLES, REPORT, record
from test_faults_train import ENV, _single

from more_scale.config import ConfigError, input_shape, load_config
from more_scale.data.build import INDEX_NAME, read_index, write_tar
from more_scale.data.pipeline import ModelInputs, SkipCounter, TrainStream, decode_sample, iter_batches
from more_scale.data.shard_reader import ShardReader, ShardTable
from more_scale.train.preflight import InputError, check_inputs


def _bad_shard_set(shards: Path, folder: Path) -> Path:
    """The first real training shard, plus one shard of bad samples (and a sample repeating a member)."""
    folder.mkdir()
    good = read_index(shards / "train")["shards"][0]
    shutil.copy(shards / "train" / good["name"], folder / good["name"])
    bad = folder / "bad-000000.tar"
    with tarfile.open(bad, "w", format=tarfile.USTAR_FORMAT) as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for key, (members, _) in BAD_SAMPLES.items():
            for ext, data in members.items():
                add(f"{key}.{ext}", data)
        add("twice.ecg.txt", REPORT)
        add("twice.ecg.txt", REPORT)
    entries = [good, {"name": bad.name, "samples": len(BAD_SAMPLES) + 1, "bytes": bad.stat().st_size}]
    (folder / INDEX_NAME).write_text(json.dumps({"samples": sum(e["samples"] for e in entries), "shards": entries}))
    return folder


def test_bad_samples_of_every_decoding_class_are_skipped_and_counted_by_both_readers(shards, tokenizer, tmp_path):
    folder = _bad_shard_set(shards, tmp_path / "train")
    cfg = load_config("tiny-cpu", [f"data.train={folder}", "data.augment=false", "data.batch_size=4"])
    shape = input_shape(cfg.model)
    expected_reasons = {f"{reason}: " for _, reason in BAD_SAMPLES.values()}
    good_samples = read_index(folder)["shards"][0]["samples"]
    # evaluation's reader: every sample once, the bad ones counted by reason
    batches = list(iter_batches(folder, cfg.data, shape, tokenizer, 64))
    read = sum(len(b.info.keys) for b in batches)
    skipped = {}
    for b in batches:
        for reason, n in b.info.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
    record("data", "evaluation reads a shard of bad samples: a 65000 x 65000 JPEG header, 100000-deep meta.json, "
                   "a structured and a complex ECG dtype, a sample repeating a member",
           f"{good_samples} good samples read; 5 skipped, counted by reason",
           f"{read} good samples read; {sum(skipped.values())} skipped, counted by reason")
    assert {r.split(": ")[0] + ": " for r in skipped} >= expected_reasons
    # training's reader: the same samples are bad, each one a counted skip served by a stand-in
    stream = TrainStream(cfg.data, shape, 0, 1, tokenizer)
    reader, skips = stream.reader(), SkipCounter()
    inputs = ModelInputs(cfg.data, shape, augment=False)
    train_bad = 0
    for index in range(len(BAD_SAMPLES) + 1):
        try:
            decode_sample(reader.read(1, index), inputs)
        except ValueError:  # BadSample is a ValueError; a repeated member is refused by the reader
            train_bad += 1
    record("data", "training reads the same bad samples", "every one refused (5 of 5)",
           f"every one refused ({train_bad} of {len(BAD_SAMPLES) + 1})")
    served = [stream.sample_at(p, reader, skips, {})["key"] for p in range(good_samples + len(BAD_SAMPLES) + 1)]
    assert len(served) == good_samples + len(BAD_SAMPLES) + 1 and sum(skips.reasons.values()) >= 1


def _tar_of(path: Path, members: list[tuple[str, bytes]], fmt: int) -> None:
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _base256_size(path: Path) -> None:
    """Rewrite the first member's size field in base-256 (GNU's form for sizes past 8 GiB), same value."""
    data = bytearray(path.read_bytes())
    size = int(data[124:136].rstrip(b"\0 ").decode(), 8)
    data[124:136] = bytes([0x80]) + size.to_bytes(11, "big")
    data[148:156] = b" " * 8
    data[148:156] = f"{sum(data[:512]):06o}\0 ".encode()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("form", ["pax long key", "gnu long name", "base-256 size", "a member without a dot"])
def test_every_tar_header_form_reads_alike_in_training_and_webdataset(tmp_path, form):
    long_key = "k" * 120
    members = [(f"{long_key}.rad.txt", b"one"), (f"{long_key}.meta.json", b"{}"), ("short.rad.txt", b"two")]
    if form == "a member without a dot":
        members.insert(1, ("README", b"stray"))
    path = tmp_path / "x.tar"
    fmt = {"pax long key": tarfile.PAX_FORMAT, "gnu long name": tarfile.GNU_FORMAT}.get(form, tarfile.GNU_FORMAT)
    _tar_of(path, members, fmt)
    if form == "base-256 size":
        _base256_size(path)
    table = ShardTable.scan(str(path))
    reader = ShardReader([str(path)], [len(table)])
    ours = [{k: v for k, v in reader.read(0, i).items() if k != "__url__"} for i in range(len(table))]
    theirs = [{k: v for k, v in s.items() if k != "__url__" and not k.startswith("__local")}
              for s in wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples())]
    record("data", f"a tar with a {form}", "training's member table reads the samples webdataset reads",
           "training's member table reads the samples webdataset reads" if ours == theirs else
           f"training read {ours}, webdataset {theirs}")


def test_a_key_the_reader_would_split_fails_the_build(tmp_path):
    path = tmp_path / "train-000000.tar"
    try:
        write_tar(path, [{"__key__": "p10.s5", "rad.txt": b"x"}])
        observed = "built"
    except ValueError as error:
        observed = str(error).split(" (")[0]
    record("build", "a sample key with a dot (webdataset would split it)", f"{path}: the shard reader does not index "
           "the samples as written", observed)
    assert not path.exists() and not path.with_name(path.name + ".tmp").exists()


@pytest.mark.parametrize("lie", ["more samples", "fewer samples", "NaN samples", "a shard of another split"])
def test_a_shard_index_that_lies_fails_before_training(shards, tmp_path, lie):
    folder = tmp_path / "train"
    shutil.copytree(shards / "train", folder)
    index = json.loads((folder / INDEX_NAME).read_text())
    first = index["shards"][0]
    expected = {"more samples": f"holds {first['samples']} samples, {INDEX_NAME} says {first['samples'] + 4}",
                "fewer samples": f"holds {first['samples']} samples, {INDEX_NAME} says {first['samples'] - 4}",
                "NaN samples": "shards[0].samples nan: expected a whole number >= 0",
                "a shard of another split": "shards[0].name '../validate/validate-000000.tar': expected the file name"}[lie]
    if lie == "more samples":
        first["samples"] += 4
    elif lie == "fewer samples":
        first["samples"] -= 4
    elif lie == "NaN samples":
        first["samples"] = float("nan")
    else:
        first["name"] = "../validate/validate-000000.tar"
    index["samples"] = sum(e["samples"] for e in index["shards"]) if lie != "NaN samples" else index["samples"]
    (folder / INDEX_NAME).write_text(json.dumps(index))
    cfg = load_config("tiny-cpu", [f"data.train={folder}"])
    try:
        check_inputs(cfg, 1)
        observed = "accepted"
    except InputError as error:
        observed = expected if expected in str(error) else str(error)
    record("inputs", f"shards.json claims {lie}", expected, observed)


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_carrying_code_is_refused_by_evaluation_and_resume(shards, two_step_run, tmp_path):
    import torch
    from launch_helpers import evaluate_main

    run = tmp_path / "run"
    shutil.copytree(two_step_run, run)
    marker = tmp_path / "payload-ran"
    states = run / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt"
    saved = torch.load(states, map_location="cpu", weights_only=False)
    torch.save({**saved, "extra": _Payload(str(marker))}, states)
    code = evaluate_main(["--checkpoint", str(run), "--shards", str(shards / "test"), "--out", str(tmp_path / "eval"),
                          "--no-figures"])
    record("checkpoint", "a pickle payload in mp_rank_00_model_states.pt, evaluated", "exit 2; the payload never ran",
           f"exit {code}; the payload {'ran' if marker.exists() else 'never ran'}")
    resumed = _single(shards, run, "train.steps=4", "train.resume=auto")
    said = "refused, a checkpoint file holds more than tensors and plain data"
    output = resumed.stdout + resumed.stderr
    record("checkpoint", "the same checkpoint resumed", f"exit 2: {said}; the payload never ran",
           f"exit {resumed.returncode}: {said if said in output else output[-300:]}"
           f"; the payload {'ran' if marker.exists() else 'never ran'}")


def test_latest_naming_another_run_is_refused(shards, two_step_run, tmp_path):
    from launch_helpers import evaluate_main

    run = tmp_path / "run"
    shutil.copytree(two_step_run, run)
    (run / "checkpoints" / "latest").write_text("../../other/checkpoints/step_00000002")
    code = evaluate_main(["--checkpoint", str(run), "--shards", str(shards / "test"), "--out", str(tmp_path / "eval"),
                          "--no-figures"])
    record("checkpoint", "checkpoints/latest names ../../other/checkpoints/step_00000002", "evaluation exits 2",
           f"evaluation exits {code}")


TASKS_FILES = {  # --tasks fault -> (file text, the words the error must hold)
    "a YAML error": ("cxr:\n  Edema: {labels: [\n", "is not valid YAML"),
    "an empty file": ("", "holds no tasks"),
    "a misspelt label field": ("cxr:\n  Edema:\n    labels: {field: chexpert.Edemma, blank: negative}\n"
                               "    positive: [Edema.]\n    negative: [No edema.]\n",
                               "labels.field 'chexpert.Edemma' is in no sample's meta.json"),
    "a task without negative prompts": ("ecg:\n  AF:\n    labels: {field: machine_report, contains: [fib]}\n"
                                        "    positive: [AF.]\n", "missing or empty: ['negative']"),
}


@pytest.mark.parametrize("fault", list(TASKS_FILES))
def test_a_bad_tasks_file_fails_naming_the_task_and_field(shards, two_step_run, tmp_path, capsys, fault):
    from launch_helpers import evaluate_main

    text, words = TASKS_FILES[fault]
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(text)
    code = evaluate_main(["--checkpoint", str(two_step_run), "--shards", str(shards / "test"), "--out",
                          str(tmp_path / "eval"), "--tasks", str(tasks), "--no-figures"])
    said = capsys.readouterr().err
    record("evaluation", f"--tasks with {fault}", f"exit 2: tasks error naming {tasks.name} ({words})",
           f"exit {code}: " + (f"tasks error naming {tasks.name} ({words})" if words in said and str(tasks) in said
                               else said[-300:]))


def test_a_fresh_run_over_an_earlier_runs_checkpoints_is_refused_unless_told(shards, two_step_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_step_run, run)
    refused = _single(shards, run, "train.steps=1")
    said = "continue it with train.resume=auto" in refused.stdout + refused.stderr
    record("train", "a fresh run (train.resume=none) in a folder holding an earlier run's checkpoints",
           "exit 2, naming train.resume=auto and train.overwrite=true; the checkpoints stay",
           f"exit {refused.returncode}, {'naming' if said else 'not naming'} train.resume=auto and "
           f"train.overwrite=true; the checkpoints {'stay' if (run / 'checkpoints' / 'step_00000002').is_dir() else 'are gone'}")
    over = _single(shards, run, "train.steps=1", "train.save_every=1", "train.overwrite=true")
    kept = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    record("train", "the same with train.overwrite=true", "exit 0; only the new run's step_00000001 is left",
           f"exit {over.returncode}; only {kept} left" if kept != ["step_00000001"] else
           f"exit {over.returncode}; only the new run's step_00000001 is left")


CONTENDER = """
import pathlib, sys, time
from more_scale.train.guard import RunLock, RunLocked
folder = pathlib.Path(sys.argv[1])
lock = RunLock(folder)
while not (folder / "go").exists():
    time.sleep(0.001)
try:
    lock.acquire(warn=lambda message: None)
    print("held", flush=True)
except RunLocked:
    print("refused", flush=True)
while not (folder / "done").exists():  # a holder stays alive while the other contends (a dead one's lock is stale)
    time.sleep(0.01)
"""


def test_two_processes_taking_over_a_stale_lock_never_both_hold_it(tmp_path):
    """The stale holder is a pid that has exited on this host; 40 trials of two contenders started together."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    both = 0
    for trial in range(40):
        folder = tmp_path / str(trial)
        folder.mkdir()
        (folder / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
        procs = [subprocess.Popen([sys.executable, "-c", CONTENDER, str(folder)], cwd=ROOT, env=ENV,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        time.sleep(0.3)  # both started and polling
        (folder / "go").touch()
        outcomes = sorted(p.stdout.readline().strip() for p in procs)
        (folder / "done").touch()
        for p in procs:
            p.wait(30)
        both += outcomes == ["held", "held"]
        assert outcomes in (["held", "refused"], ["held", "held"]), [p.stderr.read()[-2000:] for p in procs]
    record("train", "two processes take over one stale run.lock at once (40 trials)",
           "never both hold it (0 of 40)", f"{'never' if both == 0 else 'both held it'} both hold it ({both} of 40)")


@pytest.mark.parametrize("override, message", [
    ("train.betas=[2,3]", "train.betas must be two numbers in [0, 1), got [2.0, 3.0]"),
    ("model.cxr.patch_size=0", "model.cxr.patch_size must be >= 1, got 0"),
    ("model.cxr.heads=0", "model.cxr.heads must be >= 1, got 0"),
    ("model.ecg.patch_samples=0", "model.ecg.patch_samples must be >= 1, got 0"),
    ("model.cxr.image_size=0", "model.cxr.image_size must be >= 1, got 0"),
    ("data.cxr_flip_p=5", "data.cxr_flip_p must be in [0, 1], got 5.0"),
    ("model.ecg.leads=3", "model.ecg.leads must be 12 (the shards store the 12 standard leads), got 3"),
    ("train.collective_timeout_s=1e-9", "train.collective_timeout_s must be >= 1 second, got 1e-09"),
    ("data.max_text_tokens=0", "data.max_text_tokens must be >= 1, got 0"),
    ("train.steps=[1,", "override 'train.steps=[1,': the value is not valid YAML"),
])
def test_out_of_range_values_fail_naming_the_key(override, message):
    try:
        load_config("tiny-cpu", [override])
        observed = "accepted"
    except ConfigError as error:
        observed = message if str(error).startswith(message) else str(error)
    record("inputs", f"`{override}`", message, observed)


@pytest.mark.parametrize("text, message", [
    ("train:\n  steps: [1,\n", "not valid YAML"),
    (b"train:\n  steps: 3 \xff\n", "not UTF-8 text"),
    ('{"zero_optimization": "stage 2"}', "expected a JSON object with a \"zero_optimization\" object"),
    ("[1, 2]", "expected a JSON object with a \"zero_optimization\" object, got list"),
    ("{not json", "not JSON"),
])
def test_unreadable_config_files_fail_naming_the_file(tmp_path, text, message):
    deepspeed = text.startswith(("{", "[")) if isinstance(text, str) else False
    path = tmp_path / ("ds.json" if deepspeed else "config.yaml")
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    named = f"train.deepspeed_config {path}" if deepspeed else str(path)
    try:
        load_config("tiny-cpu", [f"train.deepspeed_config={path}"]) if deepspeed else load_config(path)
        observed = "accepted"
    except ConfigError as error:
        observed = f"{named}: {message}" if str(error).startswith(named) and message in str(error) else str(error)
    record("inputs", f"a {'DeepSpeed JSON' if deepspeed else 'YAML config'} that is {text!r:.40}",
           f"{named}: {message}", observed)


WATCHED = """
import sys, time
from more_scale.train.watchdog import StepWatchdog
watch = StepWatchdog(1.0, rank=3)
watch.step_done(5)
with watch.paused():  # a save or validation longer than the timeout is not a stall
    time.sleep(2.5)
watch.step_done(6)
if sys.argv[1] == "stall":
    time.sleep(10)  # as a rank waiting on a stopped peer inside a collective that has no timeout
print("finished", flush=True)
"""


@pytest.mark.parametrize("how", ["stall", "steady"])
def test_the_step_watchdog_ends_a_stalled_rank_and_only_that(how):
    result = subprocess.run([sys.executable, "-c", WATCHED, how], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=60)
    expected = {"stall": "exit 72: rank 3: no training step finished in 1 s after step 6",
                "steady": "exit 0: finished"}[how]
    said = result.stderr.strip().split(" (")[0] if result.returncode else result.stdout.strip()
    record("train", f"the step watchdog (timeout 1 s) over a rank that is {how} after a 2.5 s paused save",
           expected, f"exit {result.returncode}: {said}")
