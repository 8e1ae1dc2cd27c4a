"""No host-device sync from our code in a plain training step: counted on the CPU by the aten ops that block
the host on CUDA (more_scale/train/syncs.py), over real DeepSpeed steps, by caller."""

import json

import pytest
import torch
from conftest import launcher, run_launcher, tiny_overrides

from more_scale.train.syncs import SyncCounter


def test_counter_sees_each_kind_of_sync_and_names_the_caller():
    x = torch.arange(6.0)
    with SyncCounter() as counter:
        x.sum().item()  # _local_scalar_dense
        x[x > 2]  # boolean-mask index
        torch.nonzero(x)
        x.masked_fill(x > 2, 0.0)  # no sync: the mask stays on the device
        torch.where(x > 2, x, 0.0).sum()
    assert counter.total == 3, counter.sites
    assert all(site.startswith("test_syncs.py:") for site in counter.sites), counter.sites


@pytest.mark.parametrize("stage", ["zero1", "zero2", "zero3"])
def test_a_plain_training_step_has_no_sync_from_more_scale(shards, tmp_path, stage):
    """Three audited steps (not log or save steps) of the tiny config on one rank, DropKey and DropToken on;
    the per-step count by caller goes to metrics.jsonl, and none of it may come from more_scale/. ZeRO-1 runs in
    bf16: DeepSpeed's BF16_Optimizer, the path base.yaml takes."""
    out = tmp_path / "run"
    run_launcher([launcher("torchrun"), "--standalone", "--nproc_per_node", "1", "launch/train.py",
                  "--config", "configs/tiny-cpu.yaml", *tiny_overrides(shards, out), "train.steps=7", "train.warmup_steps=2",
                  "train.log_every=100", "train.save_every=100", "train.sync_audit_steps=3",
                  f"train.deepspeed_config={stage}", *(["train.precision=bf16"] if stage == "zero1" else [])])
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    audit = next(line for line in lines if "host_syncs_per_step" in line)
    assert audit["step"] == 5  # steps 3, 4, 5: the first two do once-per-run work
    ours = {site: n for site, n in audit["host_syncs"].items() if site.startswith("more_scale/")}
    assert ours == {} and audit["host_syncs_ours_per_step"] == 0, ours


def test_one_rank_runs_without_overlap_comm():
    """overlap_comm synchronises the device every backward; with one rank it has nothing to overlap."""
    from more_scale.config import TrainConfig
    from more_scale.train.engine import deepspeed_config

    for stage in ("zero1", "zero2", "zero3"):
        assert deepspeed_config(TrainConfig(deepspeed_config=stage), 4, 1)["zero_optimization"]["overlap_comm"] is False
    assert deepspeed_config(TrainConfig(deepspeed_config="zero2"), 4, 2)["zero_optimization"]["overlap_comm"] is True
