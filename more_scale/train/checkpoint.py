"""Checkpoints: DeepSpeed's (model, optimizer, LR schedule, per-rank shards) + our TrainState and config.

DeepSpeed writes the `latest` tag file only after every rank has written its files, so resume
never picks up a half-written checkpoint; older tags beyond `keep` are pruned after that.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from more_scale import dist


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    samples: int = 0  # global samples consumed: the training stream's position
    stream: dict = field(default_factory=dict)  # the stream's state at `samples` (TrainStream.state)


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save(engine, output_dir: str | Path, state: TrainState, config: dict, keep: int, rank: int) -> Path:
    root = checkpoint_root(output_dir)
    tag = f"step_{state.step:08d}"
    engine.save_checkpoint(str(root), tag=tag, client_state={"train_state": asdict(state), "config": config})
    dist.barrier()
    if rank == 0:
        for old in sorted(root.glob("step_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return root / tag


def resume(engine, output_dir: str | Path, how: str) -> TrainState:
    """how: "none" | "auto" (latest in output_dir, if any) | a checkpoint tag directory."""
    if how == "none":
        return TrainState()
    if how == "auto":
        root, tag = checkpoint_root(output_dir), None
        if not (root / "latest").is_file():
            return TrainState()
    else:
        path = Path(how)
        if not path.is_dir():
            raise FileNotFoundError(f"train.resume={how}: no such checkpoint directory")
        root, tag = path.parent, path.name
    loaded, client = engine.load_checkpoint(str(root), tag=tag)
    if loaded is None:
        raise RuntimeError(f"train.resume={how}: DeepSpeed could not load a checkpoint from {root}")
    return TrainState(**client["train_state"])


def latest_tag(output_dir: str | Path) -> str:
    latest = checkpoint_root(output_dir) / "latest"
    if not latest.is_file():
        raise FileNotFoundError(f"{output_dir}: no checkpoints/latest (not a finished more_scale run?)")
    return latest.read_text().strip()
