"""Fine-tune a trained run's tower on labelled splits (the MoRE reference's protocol): macro AUROC and mAP.

  python launch/finetune.py --checkpoint OUT --shards SHARDS --out FT [targets=[Edema] epochs=5 ...]
"""

import sys

from more_scale.cli import finetune_main

if __name__ == "__main__":
    sys.exit(finetune_main())
