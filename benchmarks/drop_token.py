"""DropToken speedup of a ViT-B/16 encoder (224 px, 196 patches), forward + backward, in bf16 weights
(as under DeepSpeed bf16) or fp32, against keep 1.0 measured in the same process.

  python benchmarks/drop_token.py [--batch 8] [--tower cxr|ecg] [--dtype bf16|fp32]

Use fp32 on a CPU without AVX-512 BF16/AMX: there torch's bf16 matmul has no fast path
(measured 0.3 GFLOP/s vs 99 fp32 on an AVX2-only EPYC) and the figure would time the fallback.
"""

from __future__ import annotations

import argparse

import torch
from common import DEVICE, timed, write

from more_scale.config import CxrConfig, EcgConfig
from more_scale.models.vit import build_cxr_encoder, build_ecg_encoder

KEEPS = (1.0, 0.5, 0.25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tower", choices=["cxr", "ecg"], default="cxr")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    args = parser.parse_args()
    device = DEVICE
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    rows, base, bare_base = [], None, None
    for keep in KEEPS:
        if args.tower == "cxr":
            vit = build_cxr_encoder(CxrConfig(channels=1, drop_token_keep=keep))
            x = torch.randn(args.batch, 1, 224, 224)
        else:
            vit = build_ecg_encoder(EcgConfig(drop_token_keep=keep))
            x = torch.randn(args.batch, 12, 1000)
        vit = vit.to(device=device, dtype=dtype).train()
        x = x.to(device=device, dtype=dtype)

        def step():
            vit(x).float().square().mean().backward()

        tokens = 1 + max(1, round(196 * keep))
        hidden = torch.randn(args.batch, tokens, 768, device=device, dtype=dtype, requires_grad=True)

        def blocks_only():  # the ceiling: the same blocks on `tokens` tokens, no stem, no gather
            out = hidden
            for block in vit.blocks:
                out = block(out)
            out.float().square().mean().backward()

        seconds, bare = timed(step, warmup=1, repeat=args.repeat), timed(blocks_only, warmup=1, repeat=args.repeat)
        base, bare_base = base or seconds, bare_base or bare
        rows.append({"tower": args.tower, "dtype": args.dtype, "keep": keep, "tokens": tokens, "batch": args.batch,
                     "fwd_bwd_s": seconds, "samples_per_s": args.batch / seconds, "speedup_vs_keep1": base / seconds,
                     "blocks_only_s": bare, "blocks_only_speedup": bare_base / bare})
        print(rows[-1])
    command = f"python benchmarks/drop_token.py --tower {args.tower} --dtype {args.dtype} --batch {args.batch}"
    print(write(f"drop_token_{args.tower}_{args.dtype}_{device}", rows, command,
                "Same process; keep 1.0 is the baseline of each speedup. blocks_only: the encoder's blocks alone on "
                "the kept token count, the ceiling the full encoder (stem + DropToken gather + blocks) can reach."))


if __name__ == "__main__":
    main()
