"""Resuming at another world size. ZeRO 1-3 cut the optimizer state (and under ZeRO-3 the weights) into one
part per rank, and DeepSpeed refuses to load parts cut for another world. Its answer is the universal
checkpoint: `deepspeed.checkpoint.ds_to_universal` merges the parts into one file per parameter (fp32
weights, Adam moments), which any world size loads with `checkpoint.load_universal`. Rank 0 converts once,
into `step_N.universal/` beside the tag (written as `.partial`, renamed when whole; pruned with the tag).

What carries over exactly: weights, optimizer moments, the LR schedule's step, the data stream's position
(the sample order is a function of position alone). What differs is said at resume: the global batch
when micro-batch x accumulation x world changed, and fresh per-rank random draws (checkpoint.load, which
also mends DeepSpeed's ZeRO-3 universal loader).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from more_scale import dist
from more_scale.train.checkpoint import PARTIAL, data_only_loads, fsync_tree, model_states_file, saved_world

UNIVERSAL = ".universal"


def saved_global_batch(tag_dir: Path) -> int:
    """Samples per step of the run that wrote `tag_dir`, from the config and world size it stored."""
    with data_only_loads():
        client = torch.load(model_states_file(tag_dir), map_location="cpu", weights_only=True)
    train, data = client["config"]["train"], client["config"]["data"]
    return data["batch_size"] * train.get("grad_accum", 1) * client["train_state"]["world"]


def convert(tag_dir: Path) -> Path:
    """`tag_dir` in DeepSpeed's universal format, converted now or by an earlier resume."""
    out = tag_dir.with_name(tag_dir.name + UNIVERSAL)
    if out.is_dir():
        return out
    partial = out.with_name(out.name + PARTIAL)
    shutil.rmtree(partial, ignore_errors=True)
    # --inject_missing_state: checkpoints written before they carried the universal marker convert too
    command = [sys.executable, "-m", "more_scale.train.to_universal", "--input_folder", str(tag_dir),
               "--output_folder", str(partial), "--num_extract_workers", "1", "--num_merge_workers", "1",
               "--inject_missing_state"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"converting {tag_dir} to DeepSpeed's universal format failed "
                           f"({' '.join(command)}):\n{result.stdout[-1500:]}\n{result.stderr[-1500:]}")
    fsync_tree(partial)
    os.rename(partial, out)
    return out


def fp32_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's fp32 master weights, merged over its ranks. DeepSpeed's zero_to_fp32 reads ZeRO's files but
    refuses those of its BF16_Optimizer (ZeRO-1 with fp32 gradient accumulation, `bf16_zero_*` files), which go
    through the universal format instead (one fp32 file per parameter), converted by rank 0 while the others wait."""
    if not any(tag_dir.glob("bf16_zero_pp_rank_*_optim_states.pt")):
        # its progress bar and "Detected checkpoint ..." lines would interleave with ours; errors still raise
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag_dir.name)
    if dist.rank() == 0:
        convert(tag_dir)
    dist.barrier()
    folder = tag_dir.with_name(tag_dir.name + UNIVERSAL) / "zero"
    return {p.name: torch.load(p / "fp32.pt", map_location="cpu", weights_only=True)["param"]
            for p in sorted(folder.iterdir()) if (p / "fp32.pt").is_file()}


def prepare(root: Path, tag: str, world: int, ds: dict, rank: int, warn) -> tuple[Path, str]:
    """(root, tag) to load into an engine configured by `ds`. At the world size the checkpoint was written with,
    or without ZeRO partitioning (stage 0), the tag itself; otherwise its universal-format copy, made by rank 0
    (which alone reads the old run's batch to say what differs), and `ds` is switched to load it as such."""
    old_world, zero_stage, global_batch = saved_world(root / tag), ds["zero_optimization"]["stage"], ds["train_batch_size"]
    if old_world == world or zero_stage == 0:
        return root, tag
    failed = None
    if rank == 0:
        try:
            convert(root / tag)
            old_batch = saved_global_batch(root / tag)
            batch = (f"the global batch is {global_batch} samples per step (was {old_batch}): the LR schedule goes on "
                     "by steps, so the samples seen per step changed" if old_batch != global_batch else
                     f"the global batch stays {global_batch} samples per step")
            warn(f"resuming a {old_world}-rank ZeRO-{zero_stage} checkpoint on {world} ranks through DeepSpeed's "
                 f"universal format ({root / (tag + UNIVERSAL)}): weights, optimizer moments, schedule step and data "
                 f"position carry over; {batch}")
        except (RuntimeError, OSError) as error:
            failed = error
    if dist.max_over_ranks([int(failed is not None)])[0]:  # every rank stops when rank 0 could not convert
        raise failed or RuntimeError(f"rank 0 could not convert {root / tag} to DeepSpeed's universal format")
    ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    return root, tag + UNIVERSAL

