"""Measured matmul peak of this device per dtype: the denominator of every MFU figure.

  python benchmarks/peak.py [--size 2048]
"""

from __future__ import annotations

import argparse

import torch
from common import DEVICE, DTYPES, timed, write


def matmul_tflops(dtype: torch.dtype, device: str, size: int = 2048) -> tuple[float, float]:
    """(TFLOP/s, seconds) of one size^3 matmul: the achievable peak every MFU here divides by."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    slow = dtype == torch.bfloat16 and device == "cpu"  # without AVX-512 BF16 one product can take a minute
    seconds = timed(lambda: a @ b, warmup=0 if slow else 1, repeat=1 if slow else 5)
    return 2 * size**3 / seconds / 1e12, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args()
    device = DEVICE
    rows = []
    for dtype in DTYPES:
        tflops, seconds = matmul_tflops(dtype, device, args.size)
        rows.append({"dtype": str(dtype).removeprefix("torch."), "size": args.size, "ms": 1e3 * seconds,
                     "tflops": tflops})
        print(rows[-1])
    print(write(f"peak_{device}", rows, f"python benchmarks/peak.py --size {args.size}"))


if __name__ == "__main__":
    main()
