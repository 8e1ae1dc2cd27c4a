"""DropKey attention kernels: forward + backward time and peak memory of the fused Triton kernel against
FlexAttention with the same in-kernel mask, SDPA with a materialised B x H x N x N mask, and SDPA (flash)
without DropKey: what DropKey costs over plain flash attention.

  python benchmarks/dropkey_attention.py [--dtype bf16]

Shapes: ViT-B (B 64, H 12, D 64) at N 197 (224 px) and 99 (DropToken keep 0.5), and longer sequences at
N 1024 (B 8) and 4096 (B 2), where a materialised mask grows with N^2. On a CPU only the backends that run
there are timed (no Triton: its interpreter is a test tool), at a toy size.
"""

from __future__ import annotations

import argparse
import sys

import torch
from common import DEVICE, timed, write

from more_scale.models.attention import attention, unsupported_reason

SHAPES_CUDA = [(64, 12, 197, 64), (64, 12, 99, 64), (8, 12, 1024, 64), (2, 12, 4096, 64)]
SHAPES_CPU = [(2, 4, 99, 64)]
RUNS = [  # (name, backend, DropKey rate)
    ("sdpa, no DropKey (flash)", "sdpa", 0.0),
    ("sdpa + materialised mask", "sdpa", 0.3),
    ("flex_dropkey", "flex_dropkey", 0.3),
    ("triton_dropkey", "triton_dropkey", 0.3),
]


def measure(shape, dtype, backend: str, p: float) -> dict | None:
    q, k, v = (torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3))
    if unsupported_reason(backend, q, p > 0):
        return None
    grad = torch.randn(shape, device=DEVICE, dtype=dtype)

    def forward_backward():
        out = attention(q, k, v, drop_key=p, training=True, backend=backend)
        torch.autograd.grad(out, (q, k, v), grad)

    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    seconds = timed(forward_backward, warmup=2, repeat=10 if DEVICE == "cuda" else 3)
    row = {"ms": 1e3 * seconds}
    if DEVICE == "cuda":
        row["peak_mib_above_inputs"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16" if DEVICE == "cuda" else "fp32")
    args = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    rows = []
    for shape in SHAPES_CUDA if DEVICE == "cuda" else SHAPES_CPU:
        results = {}
        for name, backend, p in RUNS:
            try:
                results[name] = measure(shape, dtype, backend, p)
            except torch.OutOfMemoryError:
                results[name] = {"ms": float("nan"), "note": "out of memory"}
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
        plain = (results.get("sdpa, no DropKey (flash)") or {}).get("ms")
        flex = (results.get("flex_dropkey") or {}).get("ms")
        for name, r in results.items():
            if r is None:
                continue
            rows.append({"B,H,N,D": "x".join(map(str, shape)), "kernel": name, **r,
                         "vs_no_dropkey": r["ms"] / plain if plain else None,
                         "vs_flex": r["ms"] / flex if flex and name == "triton_dropkey" else None})
            print(rows[-1], file=sys.stderr)
    print(write(f"dropkey_attention_{DEVICE}", rows, f"python benchmarks/dropkey_attention.py --dtype {args.dtype}",
                f"{args.dtype}, forward + backward, DropKey p 0.3 where named. Goals: triton_dropkey within 1.10x of "
                "'sdpa, no DropKey' (vs_no_dropkey) and faster than flex_dropkey (vs_flex < 1); memory O(N) (no N^2 "
                "mask). peak_mib_above_inputs: allocator peak during the call beyond the inputs."))


if __name__ == "__main__":
    main()
