"""Checkpoints: DeepSpeed's (model, optimizer, LR schedule, per-rank shards) + our TrainState and config,
written so that a crash at any moment leaves either the previous checkpoint or the new one, never a
half one that resume would pick:

1. free space is checked first ("no space left on device: need X, have Y");
2. every rank writes its files into `step_N.partial/` (DeepSpeed's `latest` file is not touched);
3. every rank fsyncs the folder's files; barrier;
4. rank 0 renames the folder to `step_N`, fsyncs the parent, and replaces `latest` atomically
   (written beside it, fsynced, renamed); older tags beyond `keep` are pruned; barrier.

Resume (`train.resume=auto`) removes stale `.partial` folders, then loads the newest tag that passes a
check (model states present, every file a complete, CRC-clean zip archive), falling back to older
tags with a warning. Several nodes must share the checkpoint folder (rank 0 renames what all wrote).
"""

from __future__ import annotations

import errno
import os
import shutil
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from more_scale import dist

PARTIAL = ".partial"
MODEL_STATES = "mp_rank_00_model_states.pt"
SPACE_MARGIN = 1.2  # free space wanted beyond the estimate (the filesystem's own overhead, other writers)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    samples: int = 0  # global samples consumed: the training stream's position
    stream: dict = field(default_factory=dict)  # the stream's state at `samples` (TrainStream.state)


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def tags(root: Path) -> list[str]:
    """Complete checkpoint tags in `root`, oldest first."""
    return sorted(p.name for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(PARTIAL))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def human(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def estimate_bytes(model) -> int:
    """A first checkpoint's size before any exists: weights in fp32, plus fp32 master weights and two Adam
    moments of every trainable parameter (ZeRO-3 partitioned parameters counted whole)."""
    params = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return sum(4 * n + (12 * n if trains else 0) for n, trains in params)


def check_free_space(root: Path, needed: int) -> None:
    """Raise ENOSPC on every rank alike when `root`'s filesystem has less free than `needed` x margin."""
    free = shutil.disk_usage(root).free
    want = int(needed * SPACE_MARGIN)
    short = dist.max_over_ranks([int(free < want)])[0]  # every rank decides alike (rank 0's view may differ)
    if short:
        raise OSError(errno.ENOSPC, f"no space left on device for a checkpoint in {root}: need {human(want)} "
                                    f"(last checkpoint + {SPACE_MARGIN - 1:.0%}), have {human(free)} free")


def save(engine, output_dir: str | Path, state: TrainState, config: dict, keep: int, rank: int,
         estimate_bytes: int) -> Path:
    """Write checkpoint `step_<state.step>` atomically (see the module docstring); returns its folder.
    `estimate_bytes`: the size expected when no earlier checkpoint tells it."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    tag = f"step_{state.step:08d}"
    done = tags(root)
    check_free_space(root, folder_bytes(root / done[-1]) if done else estimate_bytes)
    partial = root / f"{tag}{PARTIAL}"
    engine.save_checkpoint(str(root), tag=partial.name, client_state={"train_state": asdict(state), "config": config},
                           save_latest=False)
    for f in partial.rglob("*"):
        if f.is_file():
            _fsync(f)
    dist.barrier()
    final = root / tag
    if rank == 0:
        if final.exists():  # the same step saved again (a resumed run stopped where it started)
            shutil.rmtree(final)
        os.rename(partial, final)
        _fsync(root)
        _write_atomic(root / "latest", tag)
        for old in tags(root)[:-keep]:
            shutil.rmtree(root / old, ignore_errors=True)
    dist.barrier()
    return final


def problem_with(tag_dir: Path) -> str | None:
    """Why the checkpoint in `tag_dir` cannot be loaded (None when it looks whole)."""
    if not (tag_dir / MODEL_STATES).is_file():
        return f"{MODEL_STATES} missing"
    for f in sorted(tag_dir.glob("*.pt")):
        try:
            with zipfile.ZipFile(f) as archive:  # torch.save writes a zip: truncation or flipped bytes show here
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError) as error:
            return f"{f.name} is not a complete checkpoint file ({error})"
        if bad is not None:
            return f"{f.name}: member {bad} fails its CRC check"
    return None


def remove_partials(root: Path) -> list[str]:
    """Remove folders of saves that never finished (a crash mid-save); returns their names."""
    stale = sorted(p.name for p in root.glob(f"step_*{PARTIAL}"))
    for name in stale:
        shutil.rmtree(root / name, ignore_errors=True)
    return stale


def _load(engine, root: Path, tag: str) -> TrainState:
    loaded, client = engine.load_checkpoint(str(root), tag=tag)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load {root / tag}")
    return TrainState(**client["train_state"])


def resume(engine, output_dir: str | Path, how: str, rank: int, warn=print) -> TrainState:
    """how: "none" | "auto" (the newest good checkpoint in output_dir, if any) | a checkpoint tag directory."""
    if how == "none":
        return TrainState()
    if how != "auto":
        path = Path(how)
        if not path.is_dir():
            raise FileNotFoundError(f"train.resume={how}: no such checkpoint directory")
        problem = problem_with(path)
        if problem:
            raise ValueError(f"train.resume={how}: {problem}")
        return _load(engine, path.parent, path.name)
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return TrainState()
    if rank == 0:
        for name in remove_partials(root):
            warn(f"removed {root / name}: a save that never finished")
    dist.barrier()
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else ""
    candidates = sorted(set(tags(root)), reverse=True)
    if latest in candidates:  # `latest` first, then the others newest first
        candidates.remove(latest)
        candidates.insert(0, latest)
    elif (root / "latest").is_file():
        warn(f"{root / 'latest'} names {latest!r}, which is not a checkpoint here: looking for the newest good one")
    for tag in candidates:
        problem = problem_with(root / tag)
        agreed = dist.max_over_ranks([int(problem is not None)])[0]  # every rank takes the same tag
        if agreed:
            warn(f"skipping checkpoint {root / tag}: {problem or 'unreadable on another rank'}; trying an older one")
            continue
        return _load(engine, root, tag)
    if candidates:
        raise RuntimeError(f"{root}: no loadable checkpoint among {candidates} (see the warnings above)")
    return TrainState()


def latest_tag(output_dir: str | Path) -> str:
    latest = checkpoint_root(output_dir) / "latest"
    if not latest.is_file() or not latest.read_text().strip():
        raise FileNotFoundError(f"{output_dir}: no checkpoints/latest (not a finished more_scale run?)")
    return latest.read_text().strip()
