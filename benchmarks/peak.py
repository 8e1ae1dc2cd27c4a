"""Measured matmul peak of this device per dtype: the denominator of every MFU figure.

  python benchmarks/peak.py [--size 2048]
"""

from __future__ import annotations

import argparse

import torch
from common import timed, write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = (torch.float32, torch.bfloat16) + ((torch.float16,) if device == "cuda" else ())
    rows = []
    for dtype in dtypes:
        a = torch.randn(args.size, args.size, device=device).to(dtype)
        b = torch.randn(args.size, args.size, device=device).to(dtype)
        slow = dtype == torch.bfloat16 and device == "cpu"  # one bf16 2048^3 product can take tens of seconds
        seconds = timed(lambda: a @ b, warmup=1, repeat=1 if slow else 5)
        rows.append({"dtype": str(dtype).removeprefix("torch."), "size": args.size, "ms": 1e3 * seconds,
                     "tflops": 2 * args.size**3 / seconds / 1e12})
        print(rows[-1])
    print(write(f"peak_{device}", rows, f"python benchmarks/peak.py --size {args.size}"))


if __name__ == "__main__":
    main()
