"""Memory per rank of a training config before running it, whether it fits, and the largest micro-batch.

  python launch/plan.py configs/llm7b.yaml --world 8 --gpu-mem 80GiB [train.deepspeed_config=zero3 ...]
"""

import sys

from more_scale.cli import plan_main

if __name__ == "__main__":
    sys.exit(plan_main())
