"""The speed figures of a log step, and the prefetcher that feeds the step, on the CPU."""

import torch

from more_scale.batch import Batch, Bookkeeping
from more_scale.hardware import Peak, matmul_peak
from more_scale.models.flops import StepFlops
from more_scale.train import meter as meter_module
from more_scale.train.meter import StepMeter
from more_scale.train.prefetch import DevicePrefetcher


def test_window_figures_follow_from_flops_time_and_peak(monkeypatch):
    clock = iter([100.0, 102.0, 200.0])  # window starts at 100 s, reported at 102 s, next window at 200 s
    monkeypatch.setattr(meter_module.time, "perf_counter", lambda: next(clock))
    m = StepMeter(StepFlops(fixed=1e12, per_token=1e9, per_token2=0.0), Peak(4.0, "bfloat16", 8192, "test"),
                  torch.device("cpu"))
    for _ in range(2):  # two steps of one micro-batch: 8 rows, 100 real tokens padded to 20
        m.add_micro_batch(8, 100, 20)
        m.add_step(16)
    report = m.report(data_wait_s=0.5)
    flops = 2 * 8 * (1e12 + 1e9 * 20)
    assert report["tflops"] == flops / 2.0 / 1e12 and report["mfu"] == report["tflops"] / 4.0
    assert report["step_s"] == 1.0 and report["samples_per_s"] == 16.0 and report["text_tokens_per_s"] == 100.0
    assert report["data_wait_share"] == 0.25 and report["data_wait_s"] == 0.25
    assert m.steps == 0 and m.start == 200.0  # a new window


def test_prefetcher_hands_out_batches_in_order_in_the_compute_dtype():
    drawn = []

    def batches():
        for i in range(3):
            drawn.append(i)
            yield Batch.complete(torch.full((2, 1, 4, 4), float(i)), torch.zeros(2, 12, 10),
                                 torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long))

    prefetcher = DevicePrefetcher(batches(), torch.device("cpu"), torch.bfloat16)
    assert drawn == []
    first = next(prefetcher)
    assert drawn == [0]  # batch 0 handed out without waiting for the loader's batch 1
    got = [first, next(prefetcher)]
    assert [b.cxr[0, 0, 0, 0].item() for b in got] == [0.0, 1.0]
    assert got[0].cxr.dtype == torch.bfloat16 and got[0].input_ids.dtype == torch.long  # ids stay integers
    assert prefetcher.wait_s >= 0.0
    assert isinstance(got[0].info, Bookkeeping)


def test_measured_peak_is_warmed_and_fits_the_cpu_budget():
    peak = matmul_peak("cpu", torch.float32)
    assert peak.tflops > 0 and 256 <= peak.size <= 2048 and peak.dtype == "float32"
    assert peak.mfu(peak.tflops / 2) == 0.5
