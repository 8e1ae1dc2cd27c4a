"""Streaming loader: shards -> decoded samples -> collated batch dicts (DESIGN.md "The batch").

Training streams are resampled (infinite) and seeded from (seed, start step, rank, worker), so every
rank and worker draws its own reproducible sequence. Evaluation streams read each shard once, in
order. A sample that fails to decode is skipped and counted by reason and by shard; each batch carries
its worker's counts since its previous batch in `batch["skipped"]` and `batch["skipped_shards"]`.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch
import webdataset as wds

from more_scale.config import DataConfig
from more_scale.data import cxr, ecg, reports
from more_scale.data.build import read_index

_SKIPPED: Counter = Counter()  # per process: each loader worker counts its own skips, by reason
_SKIPPED_SHARDS: Counter = Counter()  # ... and by shard file name


def _count_and_continue(reason: str, error: Exception) -> bool:
    _SKIPPED[f"{reason}: {type(error).__name__}"] += 1
    return True


def _skip(reason: str, sample: dict) -> None:
    _SKIPPED[reason] += 1
    _SKIPPED_SHARDS[Path(str(sample.get("__url__", "?"))).name] += 1


def decode_sample(sample: dict, image_size: int, ecg_samples: int) -> dict | None:
    """Shard members -> arrays; None (counted) when a present member is corrupt."""
    key = sample.get("__key__", "?")
    out = {"key": key, "cxr": None, "ecg": None}
    try:
        if "cxr.jpg" in sample:
            image = cv2.imdecode(np.frombuffer(sample["cxr.jpg"], np.uint8), cv2.IMREAD_GRAYSCALE)
            if image is None:
                raise ValueError("corrupt cxr.jpg")
            out["cxr"] = cxr.to_model_input(image, image_size)
        if "ecg.npy" in sample:
            signal = np.load(io.BytesIO(sample["ecg.npy"]), allow_pickle=False)
            if signal.ndim != 2 or signal.shape[0] != len(ecg.LEADS):
                raise ValueError(f"ecg.npy shape {signal.shape}, expected (12, T)")
            if not np.isfinite(signal).all():
                raise ValueError("ecg.npy has NaN/inf")
            out["ecg"] = ecg.to_model_input(signal, ecg_samples)
        out["text"] = reports.joined_report(sample.get("rad.txt", b"").decode().strip(),
                                            sample.get("ecg.txt", b"").decode().strip())
        if not out["text"]:
            raise ValueError("both report texts are empty")
        out["meta"] = json.loads(sample["meta.json"]) if "meta.json" in sample else {}
    except (ValueError, OSError, UnicodeDecodeError) as error:
        _skip(f"{type(error).__name__}: {str(error).split(':')[0]}", sample)
        return None
    if out["cxr"] is None and out["ecg"] is None:
        _skip("neither cxr.jpg nor ecg.npy", sample)
        return None
    return out


def collate(samples: list[dict], tokenizer, max_text_tokens: int, image_size: int, ecg_samples: int) -> dict:
    """Decoded samples -> the batch dict; a missing modality is zeros with mask False."""
    n = len(samples)
    images = np.zeros((n, 1, image_size, image_size), np.float32)
    signals = np.zeros((n, len(ecg.LEADS), ecg_samples), np.float32)
    for i, s in enumerate(samples):
        if s["cxr"] is not None:
            images[i] = s["cxr"]
        if s["ecg"] is not None:
            signals[i] = s["ecg"]
    tokens = tokenizer([s["text"] for s in samples], padding="longest", truncation=True,
                       max_length=max_text_tokens, return_tensors="pt")
    skipped, skipped_shards = dict(_SKIPPED), dict(_SKIPPED_SHARDS)
    _SKIPPED.clear()
    _SKIPPED_SHARDS.clear()
    return {
        "cxr": torch.from_numpy(images),
        "cxr_mask": torch.tensor([s["cxr"] is not None for s in samples]),
        "ecg": torch.from_numpy(signals),
        "ecg_mask": torch.tensor([s["ecg"] is not None for s in samples]),
        "input_ids": tokens["input_ids"],
        "attention_mask": tokens["attention_mask"],
        "keys": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],
        "skipped": skipped,
        "skipped_shards": skipped_shards,
    }


def shard_urls(directory: str | Path) -> list[str]:
    index = read_index(directory)
    return [str(Path(directory) / entry["name"]) for entry in index["shards"]]


def _stream_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return info.id if info is not None else 0


def _rank_worker_seed(rank: int) -> int:
    return rank * 1000 + _worker_id()


def _worker_shuffle(src, bufsize: int, seed: int):
    """Shuffle buffer seeded per worker at iteration time (the pipeline is built before forking)."""
    yield from wds.shuffle(bufsize, min(bufsize, 64), seed=_stream_seed(seed, _worker_id()))(src)


def _decode_and_batch(cfg: DataConfig, tokenizer, batch_size: int, partial_batches: bool) -> list:
    """The stages every stream ends with: decode (bad samples counted, dropped), then collate."""
    return [
        wds.map(partial(decode_sample, image_size=cfg.image_size, ecg_samples=cfg.ecg_samples)),
        wds.select(lambda s: s is not None),
        wds.batched(batch_size, partial=partial_batches, collation_fn=partial(
            collate, tokenizer=tokenizer, max_text_tokens=cfg.max_text_tokens,
            image_size=cfg.image_size, ecg_samples=cfg.ecg_samples)),
    ]


def build_loader(cfg: DataConfig, rank: int, world: int, tokenizer, *, start_step: int = 0):
    """Infinite training stream of batches for this rank. `start_step` reseeds a resumed run so it
    does not replay the samples it saw before (exact stream resume is future work)."""
    urls = shard_urls(cfg.train)
    seed = _stream_seed(cfg.seed, start_step)
    pipeline = wds.DataPipeline(
        wds.ResampledShards(urls, seed=seed, deterministic=True, worker_seed=partial(_rank_worker_seed, rank)),
        wds.tarfile_to_samples(handler=partial(_count_and_continue, "unreadable tar member")),
        partial(_worker_shuffle, bufsize=cfg.shuffle_buffer, seed=seed + rank),
        *_decode_and_batch(cfg, tokenizer, cfg.batch_size, partial_batches=False),
    )
    return wds.WebLoader(pipeline, batch_size=None, num_workers=cfg.workers,
                         persistent_workers=cfg.workers > 0)


def iter_batches(directory: str | Path, cfg: DataConfig, tokenizer, batch_size: int | None = None):
    """Every sample of a shard set exactly once, in index order, in batches (single process)."""
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(shard_urls(directory)),
        wds.tarfile_to_samples(handler=partial(_count_and_continue, "unreadable tar member")),
        *_decode_and_batch(cfg, tokenizer, batch_size or cfg.batch_size, partial_batches=True),
    )
    return iter(pipeline)
