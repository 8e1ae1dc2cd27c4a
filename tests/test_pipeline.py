"""The loaders: batch contents, exact and elastic stream resume, augmentation replay, counted skips."""

import io
import itertools
import tarfile

import numpy as np
import pytest
import torch

from more_scale.batch import Bookkeeping
from more_scale.config import DataConfig, InputShape
from more_scale.data.build import read_index
from more_scale.data.pipeline import build_loader, iter_batches

SHAPE = InputShape(image_size=64, ecg_samples=1000)


def _cfg(shards, **kw):
    return DataConfig(**{"train": str(shards / "train"), "batch_size": 4, "workers": 0,
                         "max_text_tokens": 64, **kw})


def test_batch_holds_the_inputs_and_bookkeeping(shards, tokenizer):
    batch = next(iter(build_loader(_cfg(shards), SHAPE, 0, 1, tokenizer)))
    assert batch.cxr.shape == (4, 1, 64, 64) and batch.cxr.dtype == torch.float32
    assert batch.ecg.shape == (4, 12, 1000) and batch.ecg.abs().max() <= 1.0
    assert batch.cxr_mask.all() and batch.ecg_mask.all()  # paired shards
    assert batch.input_ids.shape == batch.attention_mask.shape and batch.input_ids.shape[1] <= 64
    assert (batch.input_ids[:, 0] == tokenizer.bos_token_id).all()
    assert len(batch.info.keys) == 4 and batch.info.skipped == {}


def _batches(cfg, tokenizer, rank, world, n, start=0):
    return list(itertools.islice(iter(build_loader(cfg, SHAPE, rank, world, tokenizer, start_position=start)), n))


def _merged(per_rank: list[list[dict]], field: str = "keys") -> list:
    """The ranks' streams interleaved step by step: the global order."""
    return [x for step in zip(*per_rank) for batch in step for x in getattr(batch.info, field)]


@pytest.mark.parametrize("mode", ["resampled", "epoch"])
def test_resumed_stream_equals_uninterrupted_2_ranks_2_workers(shards, tokenizer, mode):
    """Stop after 3 micro-steps, resume from the position a checkpoint stores: same keys, same
    augmented pixels, on both ranks; the epoch stream crosses an epoch boundary on the way."""
    cfg = _cfg(shards, workers=2, mode=mode, augment=True, shuffle_block=16)
    total = read_index(shards / "train")["samples"]
    steps = -(-total // 8) + 2  # 8 = 2 ranks x 4: past the end of epoch 0
    for rank in range(2):
        whole = _batches(cfg, tokenizer, rank, 2, steps)
        resumed = _batches(cfg, tokenizer, rank, 2, 3) + _batches(cfg, tokenizer, rank, 2, steps - 3, start=3 * 8)
        assert [b.info.keys for b in whole] == [b.info.keys for b in resumed]
        assert all(torch.equal(a.cxr, b.cxr) and torch.equal(a.ecg, b.ecg) for a, b in zip(whole, resumed))
        assert whole[0].info.positions == list(range(rank * 4, rank * 4 + 4))


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize("mode", ["resampled", "epoch"])
def test_stream_resumed_on_another_world_size_continues_the_global_order(shards, tokenizer, mode):
    """2 ranks x 2 workers (micro-batch 4) stopped at position 24, resumed on 1 rank x 3 workers
    (micro-batch 6): the merged keys continue exactly where the 2-rank run would have gone."""
    two = _cfg(shards, workers=2, mode=mode, shuffle_block=16)
    uninterrupted = _merged([_batches(two, tokenizer, r, 2, 9) for r in range(2)])  # positions 0..71
    one = _cfg(shards, workers=3, batch_size=6, mode=mode, shuffle_block=16)
    continued = [k for b in _batches(one, tokenizer, 0, 1, 8, start=24) for k in b.info.keys]
    assert continued == uninterrupted[24:72]
    if mode == "epoch":  # one epoch holds every training sample exactly once
        total = read_index(shards / "train")["samples"]
        first_epoch = _merged([_batches(two, tokenizer, r, 2, total // 8) for r in range(2)])
        assert len(set(first_epoch)) == len(first_epoch) == total // 8 * 8


def test_weighted_sources_mix_in_proportion(shards, tokenizer):
    """Two shard sets as data.train=A::B with weights 1:3 (resampled): about a quarter of the stream
    comes from A whatever their sizes."""
    cfg = _cfg(shards, train=f"{shards / 'train'}::{shards / 'test'}", train_weights=(1.0, 3.0), batch_size=50)
    keys = [k for b in _batches(cfg, tokenizer, 0, 1, 8) for k in b.info.keys]
    test_keys = {k for b in iter_batches(shards / "test", cfg, SHAPE, tokenizer, 64) for k in b.info.keys}
    share_a = sum(k not in test_keys for k in keys) / len(keys)
    assert 0.19 < share_a < 0.31, share_a


def test_ranks_and_seeds_differ(shards, tokenizer):
    cfg = _cfg(shards, mode="epoch")
    rank0, rank1 = (_merged([_batches(cfg, tokenizer, r, 2, 4)]) for r in range(2))
    assert not set(rank0) & set(rank1)  # one epoch: the ranks' slices never overlap
    assert rank0 != _merged([_batches(_cfg(shards, mode="epoch", seed=1), tokenizer, 0, 2, 4)])


def test_shard_reader_equals_tarfile_and_scans_each_shard_once(shards):
    from more_scale.data.pipeline import shard_urls
    from more_scale.data.shard_reader import ShardReader

    paths = shard_urls(shards / "train")[:3]
    reader = ShardReader(paths)
    for shard, path in enumerate(paths):
        with tarfile.open(path) as tar:
            expected = {}
            for m in tar.getmembers():
                key, member = m.name.split(".", 1)
                expected.setdefault(key, {})[member] = tar.extractfile(m).read()
        got = {}
        for index in reversed(range(len(expected))):  # any order: reads are by index
            sample = reader.read(shard, index)
            key = sample.pop("__key__")
            got[key] = {k: v for k, v in sample.items() if k != "__url__"}
        assert got == expected
    assert sorted(reader.tables) == [0, 1, 2]
    with pytest.raises(IndexError):
        reader.read(0, len(expected) + 5)


def test_every_sample_once_in_evaluation_order(shards, tokenizer):
    index = read_index(shards / "test")
    keys = [k for b in iter_batches(shards / "test", _cfg(shards), SHAPE, tokenizer, batch_size=5) for k in b.info.keys]
    assert len(keys) == len(set(keys)) == index["samples"]
    parts = [[(p, k) for b in iter_batches(shards / "test", _cfg(shards), SHAPE, tokenizer, 4, part=(r, 3))
              for p, k in zip(b.info.positions, b.info.keys)] for r in range(3)]
    for rank, part in enumerate(parts):  # rank r holds the batches r, r + 3, ... of 4 running indices each
        assert [p for p, _ in part] == [i for i in range(len(keys)) if i // 4 % 3 == rank]
    whole = [b.info.positions for b in iter_batches(shards / "test", _cfg(shards), SHAPE, tokenizer, 4)]
    shared = [b.info.positions for r in range(3)
              for b in iter_batches(shards / "test", _cfg(shards), SHAPE, tokenizer, 4, part=(r, 3))]
    assert sorted(map(list, shared)) == sorted(map(list, whole))  # the very batches one process builds
    assert [k for _, k in sorted(sum(parts, []))] == keys  # merged by position: the single-process order
    with pytest.raises(ValueError, match=r"part \(3, 3\): expected \(rank, world\)"):
        next(iter_batches(shards / "test", _cfg(shards), SHAPE, tokenizer, 4, part=(3, 3)))


def _bad_shard_set(shards, out):
    """A real test shard's first 6 samples, two broken: a corrupt JPEG and a NaN ECG."""
    import json

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
    buffer = io.BytesIO()
    np.save(buffer, np.full((12, 1000), np.nan, np.float16))
    samples[1]["ecg.npy"] = buffer.getvalue()
    out.mkdir()
    entries = [write_tar(out / "bad-000000.tar", samples)]
    (out / "shards.json").write_text(json.dumps({"shards": entries, "samples": 6}))
    return out, [s["__key__"] for s in samples]


BAD_REASONS = {"ValueError: corrupt cxr.jpg": 1, "ValueError: ecg.npy has NaN/inf": 1}


def test_bad_samples_are_skipped_and_counted(shards, tokenizer, tmp_path):
    """Evaluation: the rest streams, both are counted by reason and by shard."""
    bad, _ = _bad_shard_set(shards, tmp_path / "bad")
    batches = list(iter_batches(bad, _cfg(shards), SHAPE, tokenizer, batch_size=8))
    assert sum(len(b.info.keys) for b in batches) == 4
    assert {k: v for b in batches for k, v in b.info.skipped.items()} == BAD_REASONS
    assert {k: v for b in batches for k, v in b.info.skipped_shards.items()} == {"bad-000000.tar": 2}


def test_training_stream_replaces_bad_samples_in_place(shards, tokenizer, tmp_path):
    """Training (epoch mode, one pass of 6): each broken sample is counted and its position filled by
    a readable stand-in, so every position after it holds what it would have held."""
    bad, keys = _bad_shard_set(shards, tmp_path / "bad")
    batch = _batches(_cfg(shards, train=str(bad), mode="epoch", batch_size=6), tokenizer, 0, 1, 1)[0]
    assert batch.info.positions == list(range(6))
    assert batch.info.skipped.keys() == BAD_REASONS.keys()  # a stand-in drawn from 6 may be broken too: counted again
    assert batch.info.skipped_shards == {"bad-000000.tar": sum(batch.info.skipped.values())}
    order = _batches(_cfg(shards, train=str(bad), mode="epoch", batch_size=6), tokenizer, 0, 1, 1)[0].info.keys
    assert order == batch.info.keys and set(keys[2:]) <= set(batch.info.keys) and not {keys[0], keys[1]} & set(batch.info.keys)


def test_training_stream_counts_a_shard_with_a_corrupt_tar_header(shards, tokenizer, tmp_path):
    """One of two shards gets a tar header overwritten (same length, so the index check passes): every
    read of it is counted against that shard and served by a stand-in from the other."""
    import json
    import shutil

    bad = tmp_path / "train"
    bad.mkdir()
    index = read_index(shards / "train")
    index["shards"] = index["shards"][:2]
    for entry in index["shards"]:
        shutil.copy(shards / "train" / entry["name"], bad / entry["name"])
    index["samples"] = sum(e["samples"] for e in index["shards"])
    (bad / "shards.json").write_text(json.dumps(index))
    broken = bad / index["shards"][0]["name"]
    data = bytearray(broken.read_bytes())
    data[124:136] = b"not-a-size!\0"  # the first member's size field (octal digits expected)
    broken.write_bytes(bytes(data))
    batch = _batches(_cfg(shards, train=str(bad), mode="epoch", batch_size=16), tokenizer, 0, 1, 1)[0]
    assert len(batch.info.keys) == 16 and batch.info.positions == list(range(16))
    assert set(batch.info.skipped) == {"unreadable tar member: ReadError"} and sum(batch.info.skipped.values()) >= 1
    assert batch.info.skipped_shards == {broken.name: sum(batch.info.skipped.values())}
    good = {k for b in iter_batches(bad, _cfg(shards), SHAPE, tokenizer, 64) for k in b.info.keys}  # the intact shard only
    assert set(batch.info.keys) <= good


def test_skip_ledger_stops_above_the_rate_naming_shards():
    from more_scale.train.skips import MIN_SAMPLES, SkipLedger

    ledger = SkipLedger(max_rate=0.05)
    batch = Bookkeeping(keys=["k"] * 97, skipped={"ValueError: corrupt cxr.jpg": 3},
                        skipped_shards={"train-000007.tar": 3})
    for _ in range(3):
        ledger.add(batch)
    assert ledger.global_totals() == (9, 291, 0)
    ledger.check(9, 291)  # 3%: fine
    ledger.check(50, MIN_SAMPLES - 51)  # too few read to judge
    with pytest.raises(RuntimeError, match=r"60 of 300 samples read were corrupt \(20.0% > data.max_skip_rate=0.05\); "
                                           r"worst shards on this rank: train-000007.tar \(9\)"):
        ledger.check(60, 240)
