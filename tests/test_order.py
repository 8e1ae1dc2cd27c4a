"""The global stream order: a function of (seed, position) only, partitioned over ranks."""

import numpy as np
import pytest

from more_scale.data.order import GlobalOrder, SampleSpace, rank_positions, sample_seed


def _order(mode, shard_sizes=(10, 10, 10, 10), source_sizes=(40,), **kw):
    return GlobalOrder(SampleSpace(tuple(shard_sizes), tuple(source_sizes)), mode, seed=3, **kw)


def test_epoch_is_a_permutation_per_epoch_and_epochs_differ():
    order = _order("epoch", shuffle_block=10)
    epoch0 = [order.sample_at(p) for p in range(40)]
    epoch1 = [order.sample_at(p) for p in range(40, 80)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(40))
    assert epoch0 != epoch1 and epoch0 != list(range(40))


def test_shuffle_block_bounds_the_shards_a_stretch_of_the_stream_touches():
    order = _order("epoch", shuffle_block=10)
    for lo in range(0, 40, 10):
        shards = {order.space.locate(order.sample_at(p))[0] for p in range(lo, lo + 10)}
        assert len(shards) == 1  # blocks aligned with equal shards: one shard at a time
    wide = _order("epoch", shuffle_block=40)
    assert len({wide.space.locate(wide.sample_at(p))[0] for p in range(10)}) > 1


def test_locate_maps_global_ids_to_shard_and_index():
    space = SampleSpace((3, 5, 2), (8, 2))
    assert [space.locate(i) for i in (0, 2, 3, 7, 8, 9)] == [(0, 0), (0, 2), (1, 0), (1, 4), (2, 0), (2, 1)]


def test_resampled_follows_source_weights_and_is_random_access():
    order = _order("resampled", shard_sizes=(100, 10), source_sizes=(100, 10), weights=(1.0, 1.0))
    draws = np.array([order.sample_at(p) for p in range(20000)])
    assert 0.47 < (draws >= 100).mean() < 0.53  # source 2 is 10x smaller but weighted equally
    fresh = _order("resampled", shard_sizes=(100, 10), source_sizes=(100, 10), weights=(1.0, 1.0))
    assert [fresh.sample_at(p) for p in (19999, 5, 4096)] == [draws[19999], draws[5], draws[4096]]


def test_weights_need_resampled_mode_and_one_per_source():
    with pytest.raises(ValueError, match="per-source weights need mode=resampled"):
        _order("epoch", shard_sizes=(10, 10), source_sizes=(10, 10), weights=(1.0, 2.0))
    with pytest.raises(ValueError, match="expected 2 non-negative numbers"):
        _order("resampled", shard_sizes=(10, 10), source_sizes=(10, 10), weights=(1.0,))


def test_rank_positions_tile_the_stream_for_any_world_size():
    for world, batch in ((1, 6), (2, 4), (3, 2)):
        seen = [p for step in range(5) for rank in range(world) for p in rank_positions(7, step, rank, world, batch)]
        assert seen == list(range(7, 7 + 5 * world * batch))


def test_sample_seeds_depend_on_position_and_attempt_only():
    assert sample_seed(0, 5) == sample_seed(0, 5)
    assert len({sample_seed(0, 5), sample_seed(0, 6), sample_seed(0, 5, 1), sample_seed(1, 5)}) == 4


@pytest.mark.parametrize("world, workers, batch", [(3, 2, 5), (5, 3, 2), (7, 1, 3), (8, 3, 1)])
def test_odd_worlds_with_loader_workers_read_every_sample_once_per_epoch(world, workers, batch):
    """TrainStream's split: rank r's loader worker w builds local micro-batches w, w + W, ...; over as many
    micro-steps as cover three epochs of 37 samples in 5 uneven shards, started mid-stream, each position is
    read by exactly one (rank, worker), and each epoch's positions are every sample once."""
    order = _order("epoch", shard_sizes=(9, 3, 11, 7, 7), source_sizes=(37,), shuffle_block=4)
    start, steps = 11, -(-3 * 37 // (world * batch)) + 1
    read: dict[int, tuple[int, int]] = {}
    for rank in range(world):
        for worker in range(workers):
            for local_step in range(worker, steps, workers):
                for p in rank_positions(start, local_step, rank, world, batch):
                    assert p not in read, (p, read[p], (rank, worker))
                    read[p] = (rank, worker)
    assert sorted(read) == list(range(start, start + steps * world * batch))
    for epoch in range(1, 3):  # the epochs the read span covers whole
        assert sorted(order.sample_at(p) for p in range(epoch * 37, (epoch + 1) * 37)) == list(range(37))
