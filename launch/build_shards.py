"""Build WebDataset shards (+ shards.json index per split, + a tokenizer) from a raw dataset.

  python launch/build_shards.py --source mimic --root RAW --out SHARDS [--workers 4]

--root holds mimic-cxr-jpg/, mimic-cxr-reports/ and mimic-iv-ecg/ (or name each with --cxr-root,
--reports-root, --ecg-root, e.g. PhysioNet's physionet.org/files/... folders).
"""

import sys

from more_scale.cli import build_shards_main

if __name__ == "__main__":
    sys.exit(build_shards_main())
