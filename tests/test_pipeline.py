"""The streaming loader: batch contents, determinism, distinct ranks, counted skips."""

import io
import itertools
import tarfile

import numpy as np
import pytest
import torch

from more_scale.config import DataConfig
from more_scale.data.build import read_index
from more_scale.data.pipeline import build_loader, iter_batches


def _cfg(shards, **kw):
    return DataConfig(train=str(shards / "train"), batch_size=4, workers=0, shuffle_buffer=8, image_size=64,
                      max_text_tokens=64, **kw)


def test_batch_dict(shards, tokenizer):
    batch = next(iter(build_loader(_cfg(shards), 0, 1, tokenizer)))
    assert batch["cxr"].shape == (4, 1, 64, 64) and batch["cxr"].dtype == torch.float32
    assert batch["ecg"].shape == (4, 12, 1000) and batch["ecg"].abs().max() <= 1.0
    assert batch["cxr_mask"].all() and batch["ecg_mask"].all()  # paired shards
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[1] <= 64
    assert (batch["input_ids"][:, 0] == tokenizer.bos_token_id).all()
    assert len(batch["keys"]) == 4 and batch["skipped"] == {}


def _keys(loader, n):
    return [k for b in itertools.islice(iter(loader), n) for k in b["keys"]]


def test_stream_is_reproducible_and_ranks_differ(shards, tokenizer):
    cfg = _cfg(shards)
    first = _keys(build_loader(cfg, 0, 2, tokenizer), 6)
    assert first == _keys(build_loader(cfg, 0, 2, tokenizer), 6)
    assert first != _keys(build_loader(cfg, 1, 2, tokenizer), 6)
    assert first != _keys(build_loader(cfg, 0, 2, tokenizer, start_step=10), 6)  # a resumed run reseeds


def test_every_sample_once_in_evaluation_order(shards, tokenizer):
    index = read_index(shards / "test")
    keys = [k for b in iter_batches(shards / "test", _cfg(shards), tokenizer, batch_size=5) for k in b["keys"]]
    assert len(keys) == len(set(keys)) == index["samples"]


def test_bad_samples_are_skipped_and_counted(shards, tokenizer, tmp_path):
    """A corrupt JPEG and a NaN ECG in a real shard: the rest streams, both are counted by reason."""
    import json
    import shutil

    from more_scale.data.build import write_tar

    source = sorted((shards / "test").glob("*.tar"))[0]
    with tarfile.open(source) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    samples = {}
    for name, data in members.items():
        key, member = name.split(".", 1)
        samples.setdefault(key, {"__key__": key})[member] = data
    samples = list(samples.values())[:6]
    samples[0]["cxr.jpg"] = b"\xff\xd8 broken"
    nan = np.full((12, 1000), np.nan, np.float16)
    buffer = io.BytesIO()
    np.save(buffer, nan)
    samples[1]["ecg.npy"] = buffer.getvalue()
    (tmp_path / "bad").mkdir()
    entries = [write_tar(tmp_path / "bad" / "bad-000000.tar", samples)]
    (tmp_path / "bad" / "shards.json").write_text(json.dumps({"shards": entries, "samples": 6}))
    batches = list(iter_batches(tmp_path / "bad", _cfg(shards), tokenizer, batch_size=8))
    assert sum(len(b["keys"]) for b in batches) == 4
    skipped = {k: v for b in batches for k, v in b["skipped"].items()}
    assert skipped == {"ValueError: corrupt cxr.jpg": 1, "ValueError: ecg.npy has NaN/inf": 1}
    assert {k: v for b in batches for k, v in b["skipped_shards"].items()} == {"bad-000000.tar": 2}
    shutil.rmtree(tmp_path / "bad")


def test_skip_ledger_stops_above_the_rate_naming_shards():
    from more_scale.train.skips import MIN_SAMPLES, SkipLedger

    ledger = SkipLedger(max_rate=0.05)
    batch = {"skipped": {"ValueError: corrupt cxr.jpg": 3}, "skipped_shards": {"train-000007.tar": 3},
             "keys": ["k"] * 97}
    for _ in range(3):
        ledger.add(batch)
    assert ledger.global_totals() == (9, 291)
    ledger.check(9, 291)  # 3%: fine
    ledger.check(50, MIN_SAMPLES - 51)  # too few read to judge
    with pytest.raises(RuntimeError, match=r"60 of 300 samples read were corrupt \(20.0% > data.max_skip_rate=0.05\); "
                                           r"worst shards on this rank: train-000007.tar \(9\)"):
        ledger.check(60, 240)
