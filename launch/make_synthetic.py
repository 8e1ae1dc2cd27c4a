"""Write a deterministic fake MIMIC-CXR-JPG + reports + MIMIC-IV-ECG raw dataset (real formats).

  python launch/make_synthetic.py --out RAW --subjects 600 --seed 0
"""

import sys

from more_scale.cli import synthetic_main

if __name__ == "__main__":
    sys.exit(synthetic_main())
