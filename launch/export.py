"""Export a trained run as a from_pretrained directory (encoders, heads, LoRA adapter, tokenizer, input format,
model card).

  python launch/export.py --checkpoint OUT --out EXPORT [--merge-lora] [--results EVAL/results.json]
"""

import sys

from more_scale.cli import export_main

if __name__ == "__main__":
    sys.exit(export_main())
