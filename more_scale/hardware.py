"""The device's dense matmul peak: the denominator of every MFU figure (training metrics and benchmarks).

Measured, never assumed: a warmed square matmul, large enough to reach the peak (8192^3 on a GPU: a
2048^3 product reaches only about half of an H200's bf16 peak). Datasheet figures for known GPUs are
kept beside the measurement for reference, not used as the denominator.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

DATASHEET_BF16_TFLOPS = {  # dense bf16 (no sparsity), by a substring of torch.cuda.get_device_name()
    "H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.5, "H100 NVL": 835.0,
    "GH200": 989.4, "B200": 2250.0, "A100": 312.0, "L40S": 362.1, "A10": 125.0, "L4": 121.0,
}
GPU_SIZE = 8192  # a smaller product does not reach the peak on H100/H200-class GPUs
CPU_SIZE = 2048
CPU_BUDGET_S = 0.1  # a CPU without a fast bf16 path takes ~60 s for one 2048^3 bf16 product: shrink the size instead


@dataclass(frozen=True)
class Peak:
    tflops: float  # measured, warmed
    dtype: str
    size: int  # the product measured was size^3
    device: str  # e.g. "NVIDIA H200" or the CPU model
    datasheet_tflops: float | None = None  # dense bf16 datasheet figure for a known GPU

    def mfu(self, achieved_tflops: float) -> float:
        return achieved_tflops / self.tflops


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from pathlib import Path

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "CPU")


def _seconds(fn, device: torch.device, repeat: int) -> float:
    """Median wall seconds of fn() over `repeat` runs, synchronising a GPU around each."""
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@functools.cache
def matmul_peak(device: torch.device | str, dtype: torch.dtype, size: int | None = None, repeat: int = 5) -> Peak:
    """Warmed size^3 matmul throughput on `device` in `dtype`, measured once per process and argument set.
    On a CPU the size shrinks until one product fits CPU_BUDGET_S, judged from a warmed 256^3 product (a
    slow emulated bf16 path stays measurable in well under a second)."""
    device = torch.device(device)
    if size is None:
        size = GPU_SIZE if device.type == "cuda" else CPU_SIZE
        if device.type == "cpu":
            probe = torch.randn(256, 256).to(dtype)
            _seconds(lambda: probe @ probe, device, 1)  # warm-up
            rate = 2 * 256**3 / max(_seconds(lambda: probe @ probe, device, 3), 1e-9)
            while size > 256 and 2 * size**3 / rate > CPU_BUDGET_S:
                size //= 2
    g = torch.Generator(device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=g).to(dtype)
    b = torch.randn(size, size, device=device, generator=g).to(dtype)
    _seconds(lambda: a @ b, device, 2)  # warm-up: kernel selection, clocks, caches
    seconds = _seconds(lambda: a @ b, device, repeat)
    name = device_name(device)
    sheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None) if device.type == "cuda" else None
    return Peak(2 * size**3 / seconds / 1e12, str(dtype).removeprefix("torch."), size, name, sheet)
