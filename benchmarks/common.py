"""Timing and reporting helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

# where tables go; gpu_check.sh --dry-run points it elsewhere so toy figures never replace measured ones
RESULTS = Path(os.environ.get("MORE_RESULTS_DIR", Path(__file__).resolve().parent / "results"))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp16 only on a GPU: CPUs have no fast fp16 path
DTYPES = (torch.float32, torch.bfloat16) + ((torch.float16,) if DEVICE == "cuda" else ())


def timed(fn, warmup: int = 2, repeat: int = 5) -> float:
    """Median seconds of fn() over `repeat` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def machine() -> str:
    """The device in words; for a CPU its model and whether bf16 matmul has a hardware path."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    isa = "AMX" if "amx_bf16" in flags else "AVX-512 BF16" if "avx512_bf16" in flags else \
        "AVX-512, no BF16" if "avx512f" in flags else "AVX2, no AVX-512 (bf16 matmul has no fast path)"
    return f"{model} ({isa}), {torch.get_num_threads()} threads"


def write(name: str, rows: list[dict], command: str, notes: str = "") -> str:
    """benchmarks/results/<name>.json and .md; returns the Markdown table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"command": command, "machine": machine(), "torch": torch.__version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "threads": torch.get_num_threads()}
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    columns = list(dict.fromkeys(c for r in rows for c in r))  # every row's columns, in order of appearance
    lines = [f"| {' | '.join(columns)} |", f"|{'---|' * len(columns)}"]
    lines += [f"| {' | '.join(_fmt(r.get(c)) for c in columns)} |" for r in rows]
    table = "\n".join(lines)
    text = (f"# {name}\n\n`{command}` on {meta['machine']}, torch {meta['torch']}, {meta['date']}"
            f"{', OMP_NUM_THREADS=' + os.environ['OMP_NUM_THREADS'] if 'OMP_NUM_THREADS' in os.environ else ''}\n\n"
            f"{table}\n\n{notes}\n")
    (RESULTS / f"{name}.md").write_text(text)
    return table


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)
