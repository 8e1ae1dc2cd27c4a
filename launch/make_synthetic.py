"""Write a deterministic fake MIMIC-CXR-JPG + reports + MIMIC-IV-ECG raw dataset (real formats).

  python launch/make_synthetic.py --out RAW --subjects 600 --seed 0
"""

from __future__ import annotations

import argparse
import sys

from more_scale.data.synthetic import make_synthetic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output root (gets mimic-cxr-jpg/, mimic-cxr-reports/, mimic-iv-ecg/)")
    parser.add_argument("--subjects", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=320, help="native X-ray side in pixels")
    parser.add_argument("--workers", type=int, default=1, help="processes (output is identical for any count)")
    args = parser.parse_args(argv)
    print(make_synthetic(args.out, args.subjects, args.seed, args.image_size, args.workers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
