"""Train MoRE with DeepSpeed.

  deepspeed --num_gpus 2 launch/train.py --config configs/tiny-cpu.yaml data.train=SHARDS/train output_dir=OUT
  torchrun --nproc_per_node 2 launch/train.py --config configs/tiny-cpu.yaml train.steps=20
  srun python launch/train.py --config configs/base.yaml     (ranks from SLURM_* variables)
"""

import sys

from more_scale.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
