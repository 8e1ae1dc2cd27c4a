"""Evaluate a trained run on a shard set: zero-shot AUROC and retrieval recall@K vs chance.

  python launch/evaluate.py --checkpoint OUT --shards SHARDS/test --out EVAL
"""

import sys

from more_scale.cli import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
