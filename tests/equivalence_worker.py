"""Launched by test_train.py under torchrun: N training steps per (ZeRO stage, precision) on fixed
global batches, each rank taking its rows; writes the global loss per step (rank 0).

  torchrun --standalone --nproc_per_node 1 tests/equivalence_worker.py --shards S --out one.json --row-orders
  torchrun --standalone --nproc_per_node 2 tests/equivalence_worker.py --shards S --out two.json

`--row-orders` adds bf16 runs on the same batches with their rows in other orders: the loss is the
same function of the batch in any row order, so these runs differ from the plain one only in the
order of bf16 sums, which is what splitting a batch over ranks changes too. Their spread is the
bf16 round-off noise of this CPU, measured in the same process.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
from pathlib import Path

import torch

from more_scale import dist
from more_scale.config import input_shape, load_config
from more_scale.data.pipeline import iter_batches
from more_scale.data.tokenizer import load_tokenizer
from more_scale.loss import ContrastiveLoss
from more_scale.models.more import build_model
from more_scale.train.engine import build_engine, deepspeed_config
from more_scale.train.loop import train_step

# batch-independent and deterministic: no BatchNorm statistics per rank, no dropout RNG per rank, one
# attention kernel for every run (auto would time the kernels and could pick another per run)
EXACT = ["model.ecg.stem_norm=group", "model.text.dropout=0.0", "model.text.lora_dropout=0.0",
         "train.warmup_steps=2", "train.grad_clip=1.0", "model.cxr.attention=sdpa", "model.ecg.attention=sdpa"]
ROW_ORDERS = {"rows-reversed": lambda n: torch.arange(n - 1, -1, -1), "rows-rolled": lambda n: torch.arange(n).roll(3)}


def run(cfg, tokenizer, batches, stage: str, precision: str, rank: int, world: int, order=None) -> list[float]:
    micro = cfg.data.batch_size
    train_cfg = dataclasses.replace(cfg.train, deepspeed_config=f"ds_configs/zero{stage}.json", precision=precision)
    torch.manual_seed(0)
    model = build_model(cfg.model, len(tokenizer), tokenizer.pad_token_id)
    engine = build_engine(train_cfg, model, deepspeed_config(train_cfg, micro, world))
    loss_fn = ContrastiveLoss(cfg.loss, rank, world)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    losses = []
    for batch in batches:
        if order is not None:
            batch = batch.rows(order)
        values = train_step(engine, loss_fn, batch.rows(slice(rank * micro, (rank + 1) * micro)).to(engine.device, dtype))
        losses.append(dist.mean_over_ranks({"loss": values["loss"].item()})["loss"])
    del engine, model
    gc.collect()
    return losses


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--stages", default="1,2,3")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--row-orders", action="store_true", help="also ZeRO-1 bf16 runs with reordered rows")
    args = parser.parse_args()
    rank, world, _ = dist.init_distributed()
    micro = args.global_batch // world
    cfg = load_config("configs/tiny-cpu.yaml", EXACT + [f"data.train={args.shards / 'train'}",
                                                        f"data.batch_size={micro}", f"train.steps={args.steps}"])
    tokenizer = load_tokenizer(args.shards / "tokenizer")
    full = [b for b in iter_batches(args.shards / "train", cfg.data, input_shape(cfg.model), tokenizer, args.global_batch)
            if len(b) == args.global_batch]
    batches = list(itertools.islice(itertools.cycle(full), args.steps))
    results = {}
    for stage, precision in itertools.product(args.stages.split(","), args.precisions.split(",")):
        results[f"zero{stage}-{precision}"] = run(cfg, tokenizer, batches, stage, precision, rank, world)
    if args.row_orders:
        for name, order in ROW_ORDERS.items():
            results[f"zero1-bf16-{name}"] = run(cfg, tokenizer, batches, "1", "bf16", rank, world,
                                                order(args.global_batch))
    if rank == 0:
        args.out.write_text(json.dumps(results))
    dist.close()


if __name__ == "__main__":
    main()
