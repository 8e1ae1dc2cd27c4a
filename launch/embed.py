"""Embed a folder of X-rays, a folder of WFDB ECG records or a file of reports with a trained model.

  python launch/embed.py --model EXPORT --images DIR --out xrays      (xrays.npy + xrays.csv)
"""

import sys

from more_scale.cli import embed_main

if __name__ == "__main__":
    sys.exit(embed_main())
