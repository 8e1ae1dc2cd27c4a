"""Defects that only several GPUs show, each where a CPU can show it: the device a rank picks, the dtype of
SyncBatchNorm after conversion, the CPUs a SLURM task gets against the loader processes it starts."""

import re

import pytest
import torch
from conftest import ROOT

from more_scale import dist
from more_scale.config import load_config
from more_scale.models.more import build_model
from more_scale.models.vit import Fp32BatchNorm1d, Fp32SyncBatchNorm, sync_batchnorm


@pytest.mark.parametrize("local_rank, visible, expected", [(0, 8, 0), (5, 8, 5), (5, 1, 0), (3, 2, 1)])
def test_a_rank_picks_a_gpu_it_can_see(local_rank, visible, expected):
    """SLURM with --gpus-per-task=1 shows every task one cuda:0 while local ranks run 0..7."""
    assert dist.device_index(local_rank, visible) == expected


def test_sync_batchnorm_stays_fp32_when_the_model_is_bf16():
    cfg = load_config("tiny-cpu", ["model.head=reference", "model.ecg.stem_norm=batch"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 100, 0).eval()
    before = [m for m in model.modules() if isinstance(m, Fp32BatchNorm1d)]
    assert before  # heads and the ECG stem
    x = torch.randn(4, before[0].num_features)
    for m in before:
        m.running_mean.normal_()  # state to carry over
    means = [m.running_mean.clone() for m in before]
    sync_batchnorm(model).to(torch.bfloat16)
    after = [m for m in model.modules() if isinstance(m, (Fp32BatchNorm1d, torch.nn.SyncBatchNorm))]
    assert len(after) == len(before) and all(isinstance(m, Fp32SyncBatchNorm) for m in after)
    assert all(m.running_mean.dtype == m.running_var.dtype == torch.float32 for m in after)
    assert all(torch.equal(m.running_mean, mean) for m, mean in zip(after, means))
    after[0].running_mean.zero_()
    after[0].running_var.fill_(1.0)
    before[0].running_mean.zero_()
    before[0].running_var.fill_(1.0)
    out = after[0](x.to(torch.bfloat16))  # eval: normalised in fp32 with the fp32 statistics, returned in bf16
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), before[0](x.to(torch.bfloat16)).float())


def test_loader_processes_fit_the_cpus_a_slurm_task_gets():
    cpus = int(re.search(r"#SBATCH --cpus-per-task=(\d+)", (ROOT / "slurm" / "pretrain.sh").read_text()).group(1))
    for name in ("base", "llm7b", "reference"):
        workers = load_config(name, ["model.text.random_init=true"]).data.workers
        assert workers + 2 <= cpus, f"{name}: {workers} loader workers + main + pin thread > {cpus} CPUs per task"
