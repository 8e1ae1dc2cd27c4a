"""Attention backends at ViT-B size (B 8, H 12, N 197, D 64): forward and forward+backward time.
The table is what `more_scale.models.attention.CPU_ORDER` / `CUDA_ORDER` are decided from.

  python benchmarks/attention.py [--batch 8 --tokens 197]
"""

from __future__ import annotations

import argparse
import sys

import torch
from common import DEVICE, DTYPES, timed, write

from more_scale.models.attention import BACKENDS, FUSED_DROPKEY, attention, drop_key_mask, unsupported_reason


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=197)
    args = parser.parse_args()
    device = DEVICE
    rows = []
    for dtype in DTYPES:
        for drop in (False, True):
            shape = (args.batch, 12, args.tokens, 64)
            q, k, v = (torch.randn(shape, dtype=dtype, device=device, requires_grad=True) for _ in range(3))
            mask = drop_key_mask((*shape[:3], args.tokens), 0.3, device) if drop else None
            # the fused DropKey kernels draw their own mask and take none: benchmarks/dropkey_attention.py times them
            for backend in (b for b in BACKENDS if b not in FUSED_DROPKEY):
                if unsupported_reason(backend, q, drop, explicit_mask=mask is not None):
                    continue

                def forward():
                    with torch.no_grad():
                        attention(q, k, v, backend=backend, keep_mask=mask)

                def forward_backward():
                    attention(q, k, v, backend=backend, keep_mask=mask).sum().backward()

                rows.append({"dtype": str(dtype).removeprefix("torch."), "dropkey": drop, "backend": backend,
                             "fwd_ms": 1e3 * timed(forward), "fwd_bwd_ms": 1e3 * timed(forward_backward)})
                print(rows[-1], file=sys.stderr)
    print(write(f"attention_{device}", rows, "python benchmarks/attention.py"))


if __name__ == "__main__":
    main()
