"""Launched by test_train.py under torchrun: training steps on fixed global batches of 16 with the negatives
of every accumulated micro-batch (train.accum_negatives=cached, 2 x 4 rows per rank) or one large micro-batch
(8 rows per rank, no accumulation). Writes the global loss per step (rank 0).

  torchrun --standalone --nproc_per_node 2 tests/accum_worker.py --shards S --out cached.pt --accum 2 --negatives cached
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
from equivalence_worker import EXACT

from more_scale import dist
from more_scale.config import input_shape, load_config
from more_scale.data.pipeline import iter_batches
from more_scale.data.tokenizer import load_tokenizer
from more_scale.loss import ContrastiveLoss
from more_scale.models.more import build_model
from more_scale.train.engine import build_engine, deepspeed_config
from more_scale.train.loop import train_step, train_step_cached

GLOBAL = 16


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--negatives", default="micro")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    rank, world, _ = dist.init_distributed()
    per_rank = GLOBAL // world
    micro = per_rank // args.accum
    cfg = load_config("configs/tiny-cpu.yaml", EXACT + [
        f"data.train={args.shards / 'train'}", f"data.batch_size={micro}", f"train.grad_accum={args.accum}",
        f"train.accum_negatives={args.negatives}", "train.deepspeed_config=zero2", "train.precision=fp32"])
    tokenizer = load_tokenizer(args.shards / "tokenizer")
    full = [b for b in iter_batches(args.shards / "train", cfg.data, input_shape(cfg.model), tokenizer, GLOBAL)
            if len(b) == GLOBAL]
    torch.manual_seed(0)
    model = build_model(cfg.model, len(tokenizer), tokenizer.pad_token_id)
    engine = build_engine(cfg.train, model, deepspeed_config(cfg.train, micro, world))
    loss_fn = ContrastiveLoss(cfg.loss, rank, world)
    losses = []
    for batch in itertools.islice(itertools.cycle(full), args.steps):
        mine = batch.rows(slice(rank * per_rank, (rank + 1) * per_rank))
        micro_batches = [mine.rows(slice(i * micro, (i + 1) * micro)).to(engine.device) for i in range(args.accum)]
        if args.negatives == "cached":
            values = train_step_cached(engine, loss_fn, micro_batches)
        else:
            for b in micro_batches:
                values = train_step(engine, loss_fn, b)
        losses.append(dist.mean_tensors_over_ranks({"loss": values["loss"]})["loss"])
    if rank == 0:
        torch.save({"losses": losses}, args.out)
    dist.close()


if __name__ == "__main__":
    main()
