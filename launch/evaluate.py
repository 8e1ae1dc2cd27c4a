"""Evaluate a trained run on a shard set: zero-shot AUROC and retrieval recall@K vs chance.

  python launch/evaluate.py --checkpoint OUT --shards SHARDS/test --out EVAL
"""

from __future__ import annotations

import argparse
import sys

from more_scale.eval.evaluate import evaluate, print_results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run folder (output_dir of training)")
    parser.add_argument("--shards", required=True, help="shard directory with shards.json")
    parser.add_argument("--out", required=True, help="where results.json goes")
    args = parser.parse_args(argv)
    print_results(evaluate(args.checkpoint, args.shards, args.out))
    print(f"wrote {args.out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
