"""Measured matmul peak of this device per dtype: the denominator of every MFU figure.

  python benchmarks/peak.py [--size N]     (default: 8192 on a GPU, 2048 on a CPU, shrunk on a slow path)

The measurement is more_scale.hardware.matmul_peak, the function training calls at start-up.
"""

from __future__ import annotations

import argparse

from common import DEVICE, DTYPES, write

from more_scale.hardware import matmul_peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=None)
    args = parser.parse_args()
    rows = []
    for dtype in DTYPES:
        peak = matmul_peak(DEVICE, dtype, args.size)
        rows.append({"dtype": peak.dtype, "size": peak.size, "tflops": peak.tflops,
                     "datasheet_bf16_tflops": peak.datasheet_tflops or "-"})
        print(rows[-1])
    print(write(f"peak_{DEVICE}", rows, "python benchmarks/peak.py" + (f" --size {args.size}" if args.size else ""),
                "Warmed products (2 untimed, median of 5). The datasheet column is the dense bf16 figure of a known "
                "GPU, for reference: MFU divides by the measured figure."))


if __name__ == "__main__":
    main()
