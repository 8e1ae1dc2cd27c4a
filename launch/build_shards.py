"""Build WebDataset shards (+ shards.json index per split, + a tokenizer) from a raw dataset.

  python launch/build_shards.py --source mimic --root RAW --out SHARDS [--workers 4]

--root holds mimic-cxr-jpg/, mimic-cxr-reports/ and mimic-iv-ecg/ (or name each with --cxr-root,
--reports-root, --ecg-root, e.g. PhysioNet's physionet.org/files/... folders).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from more_scale.data.build import BuildOptions, mimic_pairs, write_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=["mimic"], required=True)
    parser.add_argument("--root", type=Path, help="folder holding the three MIMIC datasets")
    parser.add_argument("--cxr-root", type=Path)
    parser.add_argument("--reports-root", type=Path)
    parser.add_argument("--ecg-root", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    defaults = BuildOptions()
    parser.add_argument("--window-days", type=float, default=defaults.window_days)
    parser.add_argument("--pairing", choices=["nearest", "all"], default=defaults.pairing)
    parser.add_argument("--short-side", type=int, default=defaults.short_side)
    parser.add_argument("--ecg-rate", type=float, default=defaults.ecg_rate)
    parser.add_argument("--samples-per-shard", type=int, default=defaults.samples_per_shard)
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--tokenizer-vocab", type=int, default=defaults.tokenizer_vocab)
    args = parser.parse_args(argv)
    roots = {name: getattr(args, f"{name}_root") or (args.root / default if args.root else None)
             for name, default in (("cxr", "mimic-cxr-jpg"), ("reports", "mimic-cxr-reports"), ("ecg", "mimic-iv-ecg"))}
    missing = [f"--{name}-root" for name, path in roots.items() if path is None or not path.is_dir()]
    if missing:
        parser.error(f"not a directory: {', '.join(f'{m} ({roots[m[2:-5]]})' for m in missing)}")
    options = BuildOptions(window_days=args.window_days, pairing=args.pairing, short_side=args.short_side,
                           ecg_rate=args.ecg_rate, samples_per_shard=args.samples_per_shard, workers=args.workers,
                           tokenizer_vocab=args.tokenizer_vocab)
    console = Console()
    pairs, skipped = mimic_pairs(roots["cxr"], roots["reports"], roots["ecg"], options)
    console.print(f"{len(pairs)} X-ray/ECG pairs; not paired: {dict(skipped)}")
    summary = write_shards(pairs, args.out, options, {"source": args.source})
    console.print(f"written to {args.out}: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
