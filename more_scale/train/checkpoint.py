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

What a checkpoint holds: the trainable parameters and their optimizer state (DeepSpeed's
`exclude_frozen_parameters`: a frozen 7B base is not rewritten at every save), the LR schedule, our
TrainState (step, stream position), the resolved config, provenance (git revision, package versions),
a fingerprint of the frozen base (its local path and a hash of its weights: resume refuses another
base), and per rank the RNG states (python, numpy, torch CPU and CUDA) that DropToken, DropKey and
dropout draw from, so a run resumed at the same world size continues bit for bit.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import subprocess
import zipfile
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from deepspeed.checkpoint.constants import (
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from more_scale import dist

PARTIAL = ".partial"
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")  # ZeRO 1-2, ZeRO-3
RNG_FILE_PREFIX = "rng_state_rank"  # + rank, one file per rank
SPACE_MARGIN = 1.2  # free space wanted beyond the estimate (the filesystem's own overhead, other writers)


class CheckpointMismatch(ValueError):
    """The checkpoint cannot be used here (another frozen base, a file that is not data, a tag outside the run);
    the message says what differs."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    samples: int = 0  # global samples consumed: the training stream's position
    stream: dict = field(default_factory=dict)  # the stream's state at `samples` (TrainStream.state)
    world: int = 0  # ranks that wrote it (per-rank RNG states restore only at the same world size)

    @classmethod
    def saved(cls, fields: dict, where: Path) -> TrainState:
        """The TrainState a checkpoint stored, checked: counts are non-negative integers, the stream a mapping."""
        try:
            state = cls(**fields)
        except TypeError as error:
            raise CheckpointMismatch(f"{where}: train_state is not a more_scale TrainState ({error})") from None
        for name in ("step", "samples", "world"):
            value = getattr(state, name)
            if type(value) is not int or value < 0:
                raise CheckpointMismatch(f"{where}: train_state.{name} is {value!r}, expected an integer >= 0")
        if not isinstance(state.stream, dict):
            raise CheckpointMismatch(f"{where}: train_state.stream is {type(state.stream).__name__}, expected a mapping")
        return state


def frozen_base(model: torch.nn.Module, pretrained: str) -> dict:
    """Identity of the frozen (never checkpointed) parameters: the local path they came from, their count,
    and a sha256 over names, shapes and values (in bf16, whatever dtype holds them). Computed once, before
    the engine partitions anything."""
    digest, count = hashlib.sha256(), 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        with _whole(p):  # a ZeRO-3-partitioned parameter is gathered for the hash (a collective: every rank runs this)
            digest.update(f"{name}:{tuple(p.shape)}".encode())
            # hashed in bf16: a base held in bf16 for training and rebuilt in fp32 for evaluation is the same base
            digest.update(p.detach().to("cpu", torch.bfloat16).contiguous().view(torch.uint8).numpy().tobytes())
            count += p.numel()
    return {"path": pretrained, "parameters": count, "sha256": digest.hexdigest()}


def _whole(p: torch.nn.Parameter):
    if hasattr(p, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([p])
    return contextlib.nullcontext()


def provenance() -> dict:
    """What produced a checkpoint: the git revision of the code (when it runs from a checkout) and versions."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    versions = {}
    for package in ("more-scale", "torch", "deepspeed", "transformers", "peft"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"git_revision": rev or None, "versions": versions}


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"{RNG_FILE_PREFIX}{rank:05d}.pt"


def saved_world(tag_dir: Path) -> int:
    """Ranks that wrote the checkpoint in `tag_dir`: each saved its own RNG-state file."""
    return len(list(tag_dir.glob(f"{RNG_FILE_PREFIX}*.pt")))


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def tags(root: Path) -> list[str]:
    """Complete checkpoint tags in `root` (step_N, not their partial or universal-format siblings), oldest first."""
    return sorted(p.name for p in root.glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d+", p.name))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Every file under `folder` on disk, before the folder is renamed into place."""
    for f in folder.rglob("*"):
        if f.is_file():
            _fsync(f)


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


def save(engine, output_dir: str | Path, state: TrainState, client: dict, keep: int, rank: int,
         estimate_bytes: int) -> Path:
    """Write checkpoint `step_<state.step>` atomically (see the module docstring); returns its folder.
    `client`: what else to store (config, frozen base, provenance); `estimate_bytes`: the size expected
    when no earlier checkpoint tells it."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    tag = f"step_{state.step:08d}"
    done = tags(root)
    check_free_space(root, folder_bytes(root / done[-1]) if done else estimate_bytes)
    partial = root / f"{tag}{PARTIAL}"
    state.world = dist.world_size()
    # the universal-format marker DeepSpeed's ds_to_universal wants from its client: resuming at another world size
    universal = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    engine.save_checkpoint(str(root), tag=partial.name, client_state={"train_state": asdict(state), **client, **universal},
                           save_latest=False, exclude_frozen_parameters=True)
    torch.save(_rng_state(), _rng_file(partial, rank))
    fsync_tree(partial)
    dist.barrier()
    final = root / tag
    if rank == 0:
        if final.exists():  # the same step saved again (a resumed run stopped where it started)
            shutil.rmtree(final)
        os.rename(partial, final)
        _fsync(root)
        _write_atomic(root / "latest", tag)
        older = [t for t in tags(root) if t != tag]  # never the tag just written, which `latest` names
        for old in older[:max(0, len(older) - (keep - 1))]:
            for folder in root.glob(f"{old}*"):  # the tag and any universal-format copy made of it
                shutil.rmtree(folder, ignore_errors=True)
    dist.barrier()
    return final


def model_states_file(tag_dir: Path) -> Path | None:
    """Rank 0's model-states file (the client state lives there), whichever ZeRO stage wrote it."""
    return next((tag_dir / name for name in MODEL_STATES if (tag_dir / name).is_file()), None)


def client_state(tag_dir: Path) -> dict:
    """Rank 0's model-states file as data (memory-mapped: its tensors are not read): the client state we saved
    (config, frozen base, provenance, train_state) beside DeepSpeed's own entries."""
    with data_only_loads(tag_dir):
        return torch.load(model_states_file(tag_dir), map_location="cpu", weights_only=True, mmap=True)


def trained_from(output_dir: str | Path, tag: str) -> dict:
    """What a checkpoint says of itself, for reports and exports: its tag and step, the git revision of the code
    that wrote it and a digest of the config it was trained with."""
    client = client_state(checkpoint_root(output_dir) / tag)
    config = json.dumps(client.get("config", {}), sort_keys=True).encode()
    return {"checkpoint": tag, "step": int(tag.removeprefix("step_")),
            "git_revision": (client.get("provenance") or {}).get("git_revision"),
            "config_sha256": hashlib.sha256(config).hexdigest()[:16]}


def problem_with(tag_dir: Path) -> str | None:
    """Why the checkpoint in `tag_dir` cannot be loaded (None when it looks whole)."""
    if model_states_file(tag_dir) is None:
        return f"model states missing (neither of {', '.join(MODEL_STATES)})"
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


def load(engine, root: Path, tag: str, base: dict, rank: int, warn) -> TrainState:
    """Load checkpoint `root/tag` into the engine; `base`: this run's frozen_base(), checked against the checkpoint's."""
    with data_only_loads(root / tag):
        loaded, client = engine.load_checkpoint(str(root), tag=tag, load_module_strict=False)  # frozen base not in it
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load {root / tag}")
    if engine.load_universal_checkpoint() and engine.zero_optimization_stage() == 3:
        _repair_zero3_universal_load(engine, root / tag)
    saved = client.get("frozen_base")
    if saved and (saved["sha256"], saved["parameters"]) != (base["sha256"], base["parameters"]):
        def describe(b: dict) -> str:
            return f"{b['path'] or 'random init'} ({b['parameters']:,} parameters, sha256 {b['sha256'][:12]})"

        raise CheckpointMismatch(f"{root / tag} was trained on another frozen text base: checkpoint {describe(saved)}, now "
                         f"{describe(base)}. Resume with the same model.text.pretrained (and train.seed for a random one)")
    state = TrainState.saved(client["train_state"], root / tag)
    if state.world == dist.world_size() and _rng_file(root / tag, rank).is_file():
        with data_only_loads():  # numpy's state is an array
            _set_rng_state(torch.load(_rng_file(root / tag, rank), weights_only=True))
    else:
        warn(f"resuming a {state.world or '?'}-rank checkpoint on {dist.world_size()} ranks: the "
             "DropToken/DropKey/dropout draws start from fresh per-rank seeds")
    return state


def check_fits(model: torch.nn.Module, tag_dir: Path, config: dict) -> None:
    """Refuse, before DeepSpeed tries, a checkpoint whose trainable parameters are not this model's (another
    depth, width, LoRA rank or target set): the message names the model settings that changed, read from the
    config the checkpoint stored, and the first parameters that differ. `config`: this run's, as a dict."""
    saved = client_state(tag_dir)
    if saved.get("param_shapes"):  # ZeRO 1-3: per optimizer group, name -> full shape
        theirs = {name: tuple(shape) for group in saved["param_shapes"] for name, shape in group.items()}
    else:  # no ZeRO partitioning: the module's state holds every trainable tensor
        theirs = {name: tuple(t.shape) for name, t in saved["module"].items()}
    ours = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in model.named_parameters() if p.requires_grad}
    if theirs == ours:
        return
    changed = [f"{name} {tuple(theirs[name])} -> {ours[name]}" for name in ours if name in theirs and theirs[name] != ours[name]]
    changed += [f"{name} only in the checkpoint" for name in theirs if name not in ours]
    changed += [f"{name} only in this model" for name in ours if name not in theirs]
    settings = _differences(saved.get("config", {}).get("model", {}), config["model"], "model")
    raise CheckpointMismatch(
        f"{tag_dir} was trained with another model: config differs: "
        f"{'; '.join(settings) or 'no model setting (the code that builds the model changed)'}. "
        f"{len(changed)} parameters do not fit, e.g. {'; '.join(changed[:3])}. Resume with the checkpoint's model "
        "settings (its run folder's config.yaml), or start a fresh run in another output_dir")


def _differences(before: dict, now: dict, prefix: str) -> list[str]:
    """Dotted `key old -> new` for every leaf that differs between two config trees."""
    found = []
    for key in sorted(set(before) | set(now)):
        old, new = before.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found += _differences(old, new, f"{prefix}.{key}")
        elif old != new:
            found.append(f"{prefix}.{key} {old} -> {new}")
    return found


def _repair_zero3_universal_load(engine, universal_dir: Path) -> None:
    """Undo two slips of DeepSpeed 0.19's ZeRO-3 universal loader (stage3.load_hp_checkpoint_state_from_checkpoint_
    dir_stage3), both seen as weights 3e-4 off an uninterrupted run after two steps: it copies parameter group 0's
    hyperparameters to every group (weight decay on the norms, biases and logit scale exempt from it), and hands
    every group one shared Adam `step` tensor, which AdamW then increments once per group per step."""
    with data_only_loads():
        saved = torch.load(universal_dir / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=True)
    groups = saved["optimizer_state_dict"]["param_groups"]
    optimizer = engine.optimizer.optimizer
    if len(groups) != len(optimizer.param_groups):
        raise RuntimeError(f"{universal_dir}: {len(groups)} optimizer parameter groups saved, this run has "
                           f"{len(optimizer.param_groups)}")
    for group, own in zip(optimizer.param_groups, groups):
        group.update({key: value for key, value in own.items() if key != "params"})
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def find(output_dir: str | Path, how: str, rank: int, warn=print) -> tuple[Path, str] | None:
    """The checkpoint to resume from, as (root, tag), or None to start afresh. how: "none" | "auto" (the newest
    good checkpoint in output_dir, if any) | a checkpoint tag directory. Every rank returns the same one."""
    if how == "none":
        return None
    if how != "auto":
        path = Path(how)
        if not path.is_dir():
            raise FileNotFoundError(f"train.resume={how}: no such checkpoint directory")
        problem = problem_with(path)
        if problem:
            raise ValueError(f"train.resume={how}: {problem}")
        return path.parent, path.name
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return None
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
        return root, tag
    if candidates:
        raise RuntimeError(f"{root}: no loadable checkpoint among {candidates} (see the warnings above)")
    return None


def clear_for_fresh_start(output_dir: str | Path, overwrite: bool) -> None:
    """A run that starts afresh (train.resume=none) in a folder holding another run's checkpoints would write
    step_1 among them and prune by name: refused, naming the ways on, unless `overwrite` (then they go)."""
    root = checkpoint_root(output_dir)
    found = tags(root) if root.is_dir() else []
    if not found:
        return
    if not overwrite:
        raise FileExistsError(f"output_dir {output_dir} holds checkpoints of an earlier run (newest {found[-1]}): "
                              "continue it with train.resume=auto, start afresh over it with train.overwrite=true "
                              "(deletes them), or choose another output_dir")
    shutil.rmtree(root)


def latest_tag(output_dir: str | Path) -> str:
    """The tag `checkpoints/latest` names: a step_N folder beside it, never a path out of the run folder."""
    latest = checkpoint_root(output_dir) / "latest"
    if not latest.is_file() or not latest.read_text().strip():
        raise FileNotFoundError(f"{output_dir}: no checkpoints/latest (not a finished more_scale run?)")
    return checked_tag(output_dir, latest.read_text().strip())


def checked_tag(output_dir: str | Path, tag: str) -> str:
    """`tag` when it names a checkpoint folder of this run (step_N in its checkpoints/); else CheckpointMismatch."""
    if not re.fullmatch(r"step_\d+", tag):
        raise CheckpointMismatch(f"{output_dir}: checkpoint tag {tag!r} is not a step_N folder name of this run")
    if not (checkpoint_root(output_dir) / tag).is_dir():
        raise FileNotFoundError(f"{output_dir}: no checkpoint {checkpoint_root(output_dir) / tag}")
    return tag


# what DeepSpeed's checkpoint files hold beside tensors and plain containers (found by loading ZeRO 1-3 and
# universal checkpoints with weights_only=True), and our RNG states (numpy's state is a uint32 array): classes
# and functions of DeepSpeed and numpy, rebuilt from plain values; none runs code from the file
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
SAFE_GLOBALS = [fragment_address, LossScaler, ZeroStageEnum,
                np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]


@contextlib.contextmanager
def data_only_loads(where: Path | None = None):
    """Inside, every torch.load (ours, DeepSpeed's, which passes weights_only=False, and zero_to_fp32's) unpickles
    tensors and plain data only: a checkpoint folder from someone else cannot run code here. A file holding
    anything else raises CheckpointMismatch naming `where` and the global torch would not unpickle."""
    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"  # torch reads it at every load, over the caller's weights_only=False
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            yield
    except pickle.UnpicklingError as error:
        lines = str(error).splitlines()
        named = next((line.strip() for line in lines if "Unsupported global" in line or "GLOBAL" in line), lines[0])
        raise CheckpointMismatch(f"{where or 'checkpoint'}: refused, a checkpoint file holds more than tensors and "
                                 f"plain data (unpickling it could run code): {named[:300]}") from None
    finally:
        if previous is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous
