"""Registers, spills and shared memory of every fused DropKey kernel launch, compiled ahead of time for
sm_80 and sm_90 (no GPU needed) with our Triton and the GPU image's (3.6, from `make install`).

  python benchmarks/kernel_compile.py [--triton-3.6 .venv/triton-3.6]

The table lists head dims 64 (ViT-B, the paper) and 128 at N 99 with DropKey on, each tile candidate the
tuner may pick; `spill B` > 0 means registers went to local memory (slow). All builds of the full matrix
(tests/test_kernel_compile.py) are counted in the notes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import write

ROOT = Path(__file__).resolve().parent.parent


def builds(side_folder: Path | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (side_folder, ROOT) if p)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "builds.json"
        subprocess.run([sys.executable, "-m", "more_scale.kernels.aot", "--json", str(out)], cwd=ROOT, env=env)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--triton-3.6", dest="side", type=Path, default=ROOT / ".venv" / "triton-3.6")
    args = parser.parse_args()
    rows, notes = [], []
    for side in [None] + ([args.side] if (args.side / "triton").is_dir() else []):
        report = builds(side)
        failed = sum(1 for b in report["builds"] if b["error"])
        notes.append(f"Triton {report['triton']}: {len(report['builds']) - failed} of {len(report['builds'])} builds "
                     f"compiled, {sum(1 for b in report['builds'] if b['spill_bytes'])} with spills")
        for b in report["builds"]:
            c = b["case"]
            if c["n"] == 99 and c["d"] in (64, 128) and c["offset"] == 0 and c["p"] > 0:
                rows.append({"triton": report["triton"], "sm": b["arch"], "dtype": c["dtype"], "D": c["d"],
                             "kernel": b["kind"], "tiles (M x N / warps / stages)": b["tiles"],
                             "registers": b["registers"], "spill B": b["spill_bytes"],
                             "shared KiB": None if b["shared_bytes"] is None else round(b["shared_bytes"] / 1024, 1),
                             "error": b["error"]})
    print(write("kernel_resources", rows, "python benchmarks/kernel_compile.py",
                "; ".join(notes) + ". Read from cuobjdump --dump-resource-usage (registers, stack + local = spill) "
                "and Triton's metadata (dynamic shared memory). fp32 runs TF32 products; the `auto` backend picks "
                "this kernel for bf16/fp16 only."))


if __name__ == "__main__":
    main()
