"""1 vs 2 ranks on CPU (gloo) under DeepSpeed ZeRO 1/2/3: where a training step's time goes when a
second rank joins - the gathered negatives (inside the loss phase) and ZeRO's communication (inside
backward and the optimizer step) - per stage. One thread per rank, so each rank computes at the same
speed in both runs and the extra time is communication and contention.

  python benchmarks/scaling.py [--preset small] [--batch 8] [--steps 4]

It runs itself under torchrun once per (world size, ZeRO stage). The multi-node picture (bytes per
step at 8-512 GPUs) is benchmarks/scaling_model.py -> SCALING.md.
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

HERE = Path(__file__).resolve().parent
PHASES = ("forward", "loss", "backward", "optimizer")  # optimizer = engine.step()


def worker(args) -> None:
    import torch
    from throughput import PRESETS, VOCAB, Timer, Variant, make_batch, model_config

    from more_scale import dist
    from more_scale.config import LossConfig, TrainConfig
    from more_scale.loss import ContrastiveLoss
    from more_scale.models.more import build_model
    from more_scale.train.engine import build_engine, deepspeed_config

    rank, world, _ = dist.init_distributed()
    torch.manual_seed(0)
    model = build_model(model_config(PRESETS[args.preset], Variant("recipe", precision="fp32")), VOCAB, 1)
    cfg = TrainConfig(deepspeed_config=str(HERE.parent / "ds_configs" / f"zero{args.zero}.json"), precision="fp32",
                      steps=100, warmup_steps=1)
    engine = build_engine(cfg, model, deepspeed_config(cfg, args.batch, world))
    loss_fn = ContrastiveLoss(LossConfig(), rank, world)
    batch, _ = make_batch(args.batch, pad_to_512=False, seed=rank)
    timer = Timer("cpu")
    for step in range(args.steps + 1):
        if step == 1:  # the first step warms up (allocations, DeepSpeed's lazy buffers)
            timer = Timer("cpu")
        dist.barrier()  # phases start together on every rank
        timer.lap("wait")
        embeddings = engine(batch)
        timer.lap("forward")
        loss = loss_fn(embeddings, batch.cxr_mask, batch.ecg_mask)["loss"]
        timer.lap("loss")
        engine.backward(loss)
        timer.lap("backward")
        engine.step()
        timer.lap("optimizer")
    if rank == 0:
        row = {"world": world, "zero": args.zero, **{p: timer.seconds[p] / args.steps for p in PHASES}}
        Path(args.out).write_text(json.dumps(row))
    dist.close()


def run(world: int, zero: int, args, out: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
           "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port", str(port),
               str(Path(__file__)), "--worker", "--zero", str(zero), "--preset", args.preset, "--batch", str(args.batch),
               "--steps", str(args.steps), "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"world {world} ZeRO {zero} failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from common import write

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for zero in (1, 2, 3):
            one, two = (run(world, zero, args, Path(tmp) / f"{world}_{zero}.json") for world in (1, 2))
            for row in (one, two):
                total = sum(row[p] for p in PHASES)
                rows.append({"zero": zero, "world": row["world"], "total_s": total,
                             **{f"{p}_s": row[p] for p in PHASES},
                             "extra_vs_1_rank": total / sum(one[p] for p in PHASES) - 1,
                             **{f"{p}_extra_s": row[p] - one[p] for p in PHASES}})
                print(rows[-1], flush=True)
    command = f"python benchmarks/scaling.py --preset {args.preset} --batch {args.batch} --steps {args.steps}"
    print(write("scaling_cpu_gloo", rows, command,
                "One thread per rank, micro-batch per rank fixed (weak scaling). extra_vs_1_rank: step time over the "
                "1-rank step - 1. *_extra_s: each phase's seconds over the 1-rank run's: the gathered "
                "negatives sit in 'loss', ZeRO-1/2 gradient reduction in 'backward'/'optimizer', ZeRO-3 parameter "
                "gathers in 'forward'/'backward'."))


if __name__ == "__main__":
    main()
