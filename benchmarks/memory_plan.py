"""Planned against measured memory per rank: launch/plan.py's estimate beside the peak of the memory that torch
tensors hold in a real DeepSpeed training run of the same config, rank by rank.

The measure: on a GPU, torch.cuda.max_memory_allocated over the whole run. On a CPU, torch's profiler with
profile_memory=True sees every CPU tensor allocation and free from before the model is built, and the peak of
its running total ("Total Allocated") is the same quantity for the host allocator. The plan's CUDA-runtime row
(context, NCCL buffers: not tensors) is left out of the comparison on either device; memory outside torch's
allocator (Python objects, gloo buffers, loader workers) is in neither figure.

  python benchmarks/memory_plan.py --config tiny-cpu --world 2 [dotted overrides]

Runs `torchrun --nproc_per_node WORLD` on itself with --worker; each rank trains the config (train.steps as
given; a few suffice: the peak is reached in the first optimizer step) and writes its peak to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_ROW = "runtime (CUDA context, NCCL)"


def _cpu_peak_from_trace(trace: Path) -> int:
    events = json.loads(trace.read_text())["traceEvents"]
    return max((e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"), default=0)


def worker(config: str, overrides: list[str], out: Path) -> None:
    """One rank: train the config while measuring its tensors' peak; write {rank: peak bytes}."""
    from more_scale import dist
    from more_scale.config import load_config
    from more_scale.hardware import matmul_peak
    from more_scale.train.engine import engine_device
    from more_scale.train.loop import train

    cfg = load_config(config, overrides)
    rank = int(os.environ.get("RANK", 0))
    # training measures the device's matmul peak first (a few large products); that probe is cached per process,
    # so taken here it stays out of the measured window, as it stays out of the model's memory in training
    if torch.cuda.is_available():  # before the probe: each rank measures (and fills) its own GPU, not cuda:0
        torch.cuda.set_device(dist.device_index(int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()))
    matmul_peak(engine_device(), torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        try:
            train(cfg)
        finally:
            dist.close()
        peak = torch.cuda.max_memory_allocated()
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            try:
                train(cfg)
            finally:
                dist.close()
        with tempfile.TemporaryDirectory() as tmp:
            trace = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(trace))
            peak = _cpu_peak_from_trace(trace)
    out.with_name(f"{out.stem}.rank{rank}.json").write_text(json.dumps({"rank": rank, "peak_bytes": peak}))


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def measure(config: str, overrides: list[str], world: int, out_dir: Path) -> list[int]:
    """Per-rank peaks of a `world`-rank torchrun training of the config."""
    out = out_dir / "peak.json"
    command = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(world), "--master_port",
               _free_port(), str(Path(__file__).resolve()), "--worker", str(out), "--config", config,
               f"output_dir={out_dir / 'run'}", *overrides]
    # the repo first, then whatever PYTHONPATH holds: on the GPU machine the carried wheels live there
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONPATH=path)
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return [json.loads(out.with_name(f"peak.rank{r}.json").read_text())["peak_bytes"] for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny-cpu")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--name", default=None, help="results name (default memory_plan_<device>)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    if args.worker:
        worker(args.config, args.overrides, args.worker)
        return

    from common import DEVICE, write

    from more_scale.config import load_config
    from more_scale.data.tokenizer import load_tokenizer
    from more_scale.plan import plan

    with tempfile.TemporaryDirectory() as tmp:
        peaks = measure(args.config, args.overrides, args.world, Path(tmp))
        cfg = load_config(args.config, args.overrides)
        vocab = len(load_tokenizer(Path(tmp) / "run" / "tokenizer"))  # the run's: it sizes the text embeddings
    p = plan(cfg, args.world, 80 * 2**30, vocab=vocab, device_type=DEVICE)
    planned = p.total - p.rows.get(RUNTIME_ROW, 0.0)
    mib = 2**20
    rows = [{"rank": r, "measured peak MiB": peak / mib, "planned MiB": planned / mib, "planned / measured": planned / peak}
            for r, peak in enumerate(peaks)]
    breakdown = "\n".join(f"- {name}: {value / mib:.2f} MiB" for name, value in p.rows.items() if name != RUNTIME_ROW)
    notes = (f"Plan rows (per rank, {p.micro_batch} samples per micro-batch):\n{breakdown}\n"
             f"- activations: {p.activations_per_sample * p.micro_batch / mib:.2f} MiB\n\n"
             "Measured: the peak of memory held by torch tensors per rank over the whole run "
             f"({'torch.cuda.max_memory_allocated' if DEVICE == 'cuda' else 'torch.profiler profile_memory, Total Allocated'}).")
    command = "python benchmarks/memory_plan.py " + " ".join(sys.argv[1:])
    table = write(args.name or f"memory_plan_{DEVICE}", rows, command, notes)
    print(table)
    print(notes)


if __name__ == "__main__":
    main()
