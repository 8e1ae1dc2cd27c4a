"""Train MoRE with DeepSpeed.

  deepspeed --num_gpus 2 launch/train.py --config configs/tiny-cpu.yaml data.train=SHARDS/train output_dir=OUT
  torchrun --nproc_per_node 2 launch/train.py --config configs/tiny-cpu.yaml train.steps=20
  srun python launch/train.py --config configs/base.yaml     (ranks from SLURM_* variables)
"""

from __future__ import annotations

import argparse
import sys

from more_scale import dist
from more_scale.config import ConfigError, load_config
from more_scale.train.loop import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML experiment config (configs/*.yaml)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.steps=20 data.batch_size=8")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)  # fails here, before any process group exists
    except (ConfigError, FileNotFoundError) as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    try:
        train(cfg)
    finally:
        dist.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
