"""Loader throughput per worker process: read by index + JPEG decode + augment + ECG + tokenise +
collate, at the model's 224 px and 12 x 1000 ECG, augmentation off and on. One process, one thread:
what one loader worker (one core) delivers; the stage rows say where its time goes.

  python benchmarks/data_pipeline.py [--shards DIR] [--samples 2000] [--remote s3://bucket/prefix [--upload]]

Without --shards it builds synthetic MIMIC-like shards (256 px short side, as the builder stores) in a
temporary folder first, 32 samples per shard: the stream's draws then spread over a dozen shards, as
they spread over hundreds in a real shard set.

--remote URL reads the same shard set from an object store too (--upload puts it there first; endpoint and
credentials from AWS_*), augmentation on, beside the local figure of the same run: samples/s of one worker, the
time to the first batch, the bytes read per sample (one ranged GET each), and the whole-shard approach (download
every shard a sample touches, as wids and MosaicML Streaming do) on the same samples.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
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
from more_scale.data.shard_reader import ShardReader
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
    reader = ShardReader(stream.paths)
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


def stream_rate(cfg: DataConfig, tokenizer, samples: int) -> tuple[float, float]:
    """(samples/s of one worker over `samples` after its first batch, seconds from nothing to the first batch)."""
    start = time.perf_counter()
    batches = iter(TrainStream(cfg, SHAPE, 0, 1, tokenizer))  # this process is the one worker
    next(batches)
    first = time.perf_counter() - start
    steps = max(1, samples // cfg.batch_size)
    start = time.perf_counter()
    for _ in itertools.islice(batches, steps):
        pass
    return steps * cfg.batch_size / (time.perf_counter() - start), first


def remote_rows(url: str, tokenizer, batch: int, samples: int, local_rate: float, local_first: float) -> list[dict]:
    """The stream from `url` beside the local one, and what reading a sample costs there."""
    cfg = DataConfig(train=f"{url}/train", batch_size=batch, workers=0, augment=True, max_text_tokens=256)
    rate, first = stream_rate(cfg, tokenizer, samples)
    stream = TrainStream(cfg, SHAPE, 0, 1, tokenizer)
    where = [stream.space.locate(stream.order.sample_at(p)) for p in range(min(samples, 512))]
    reader = ShardReader(stream.paths)
    for w in where:
        reader.read(*w)
    touched = sorted({shard for shard, _ in where})
    start = time.perf_counter()
    whole = sum(len(storage.read_bytes(stream.paths[shard])) for shard in touched)
    whole_s = time.perf_counter() - start
    return [
        {"augment": True, "what": "local disk: end to end (one worker process)", "samples_per_s": local_rate,
         "ms_per_sample": 1e3 / local_rate, "first_batch_s": local_first, "vs_local": 1.0},
        {"augment": True, "what": f"{url}: end to end (one worker process)", "samples_per_s": rate,
         "ms_per_sample": 1e3 / rate, "first_batch_s": first, "vs_local": rate / local_rate},
        {"augment": True, "what": f"{url}: ranged GET per sample ({len(where)} samples)",
         "bytes_per_sample": reader.bytes_read / len(where)},
        {"augment": True, "what": f"whole-shard download of the {len(touched)} shards those samples touch",
         "bytes_per_sample": whole / len(where), "ms_per_sample": 1e3 * whole_s / len(where)},
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, help="a shard folder (holds train/ and tokenizer/)")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--remote", help="an object store prefix holding the same shard set (s3://bucket/prefix)")
    parser.add_argument("--upload", action="store_true", help="upload the shard set to --remote first")
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
            rate, first = stream_rate(cfg, tokenizer, args.samples)
            stream = TrainStream(cfg, SHAPE, 0, 1, tokenizer)
            stages = stage_rows(stream, ModelInputs(cfg, SHAPE, augment), min(args.samples, 512), tokenizer)
            rows.append({"augment": augment, "what": "end to end (one worker process)", "samples_per_s": rate,
                         "ms_per_sample": 1e3 / rate})
            rate_on, first_on = rate, first  # the last pass is the augmented one: the remote rows compare with it
            rows += [{"augment": augment, "what": s["stage"], "samples_per_s": 1e3 / s["ms_per_sample"],
                      "ms_per_sample": s["ms_per_sample"]} for s in stages]
            print(rows[-len(stages) - 1])
        workers = os.cpu_count() or 1
        rate = loader_rate(cfg, tokenizer, workers, max(1, args.samples // args.batch))
        rows.append({"augment": True, "what": f"DataLoader, {workers} workers (all cores), into the main process",
                     "samples_per_s": rate, "ms_per_sample": 1e3 / rate})
        print(rows[-1])
        if args.remote:
            if args.upload:
                storage.upload_tree(shards, args.remote)
            remote = remote_rows(args.remote, tokenizer, args.batch, args.samples, rate_on, first_on)
            print(write("data_pipeline_remote_cpu", remote,
                        f"python benchmarks/data_pipeline.py --samples {args.samples} --remote {args.remote}"
                        + (" --upload" if args.upload else ""),
                        "One process, one thread: one loader worker, augmentation on, the same shard set and stream from "
                        "local disk and from the object store in the same run. Bytes per sample: what the reader fetched "
                        "(one ranged GET a sample) against downloading each touched shard whole."))
        command = f"python benchmarks/data_pipeline.py --samples {args.samples}" + \
            (f" --shards {args.shards}" if args.shards else "")
        print(write("data_pipeline_cpu", rows, command,
                    f"One process, torch and OpenCV at 1 thread: one loader worker on one core. Micro-batch "
                    f"{args.batch}, {args.samples} samples end to end; stages timed alone on 512 samples; the last "
                    f"row is the real DataLoader. Goal: 1000 samples/s per core with augmentation on. The JPEG "
                    f"decode row is the floor of any loader on this machine: compare ratios across machines."))


if __name__ == "__main__":
    main()
