"""The first thing gpu_check.sh runs: does each attention kernel build and compute right on this device?
One forward + backward per backend at the paper's shapes (head dim 64, N 99 = DropToken keep 0.5 and
N 197), with DropKey, against the float64 reference under the same mask (attention.check_backend, the
check `auto` runs at first use). Exits 1 when the fused DropKey kernel fails: every later figure would be
of a fallback.

  python benchmarks/gpu_smoke.py      # on a CPU: TRITON_INTERPRET=1 runs the Triton kernel interpreted
"""

from __future__ import annotations

import sys

import torch
from common import DEVICE, write

from more_scale.models.attention import check_backend, unsupported_reason

BACKENDS = ("triton_dropkey", "sdpa", "xformers", "flash_attn")  # flex_dropkey: its compile is timed in dropkey_attention.py
LENGTHS = (99, 197)


def main() -> int:
    device = torch.device(DEVICE)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    rows = []
    for backend in BACKENDS:
        for n in LENGTHS:
            probe = torch.zeros(1, 2, n, 64, device=device, dtype=dtype)
            reason = unsupported_reason(backend, probe, drop_key_active=backend != "flash_attn")
            failure = None if reason else check_backend(backend, device, dtype, 64, n)
            rows.append({"backend": backend, "N": n, "dtype": str(dtype).removeprefix("torch."),
                         "result": "not run: " + reason if reason else failure or "matches the reference"})
            print(rows[-1], file=sys.stderr)
    print(write(f"gpu_smoke_{DEVICE}", rows, "python benchmarks/gpu_smoke.py",
                "One forward + backward per backend with DropKey p 0.3 (flash_attn without: it takes no mask) against "
                "the float64 reference under the same mask; relative error bound 0.1 (a broken build misses by O(1))."))
    fused = [r for r in rows if r["backend"] == "triton_dropkey"]
    return 0 if all(r["result"] == "matches the reference" for r in fused) else 1


if __name__ == "__main__":
    sys.exit(main())
