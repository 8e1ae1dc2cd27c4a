"""Collectives belong to dist.py, and its helpers put their tensors where the backend can reduce them."""

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed

from more_scale import dist
from more_scale.train import engine

PACKAGE = Path(__file__).resolve().parent.parent / "more_scale"
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "all_gather_object",
               "broadcast", "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor",
               "all_to_all", "all_to_all_single", "barrier", "gather", "scatter", "send", "recv", "isend", "irecv",
               "monitored_barrier"}


def _distributed_aliases(tree: ast.Module) -> set[str]:
    """Names under which a module imported torch.distributed (import torch.distributed as x / from torch import distributed)."""
    names = {"torch.distributed"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname or a.name for a in node.names if a.name == "torch.distributed"}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch" :
            names |= {a.asname or a.name for a in node.names if a.name == "distributed"}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            names |= {f"<from>{a.name}" for a in node.names if a.name in COLLECTIVES}
    return names


def test_no_module_but_dist_calls_a_collective():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "dist.py":
            continue
        tree = ast.parse(path.read_text())
        aliases = _distributed_aliases(tree)
        offenders += [f"{path.relative_to(PACKAGE.parent)}: imports {n.removeprefix('<from>')} from torch.distributed"
                      for n in aliases if n.startswith("<from>")]
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
                owner = ast.unparse(node.func.value)
                if owner in aliases:
                    offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {owner}.{node.func.attr}")
    assert not offenders, "collectives outside more_scale/dist.py:\n" + "\n".join(offenders)


def test_under_nccl_the_communication_device_is_the_engines_gpu(monkeypatch):
    monkeypatch.setattr(dist, "backend", lambda: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dist.comm_device() == torch.device("cuda", 3) == engine.engine_device()
    monkeypatch.setattr(dist, "backend", lambda: "gloo")
    assert dist.comm_device() == torch.device("cpu")


class _Reached(Exception):
    pass


@pytest.mark.parametrize("helper", ["sum_over_ranks", "mean_over_ranks", "mean_tensors_over_ranks", "AnyRankFlag"])
def test_helpers_hand_collectives_tensors_on_the_communication_device(monkeypatch, helper):
    """With the communication device standing in as `meta` (a CPU-only build has no CUDA device), every
    tensor a helper hands to an all-reduce must be on it, whatever device its inputs came from."""
    seen = []

    def all_reduce(tensor, *args, **kwargs):
        seen.append(tensor.device)
        raise _Reached

    monkeypatch.setattr(dist, "comm_device", lambda: torch.device("meta"))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    call = {"sum_over_ranks": lambda: dist.sum_over_ranks([1, 2]),
            "mean_over_ranks": lambda: dist.mean_over_ranks({"loss": 1.5}),
            "mean_tensors_over_ranks": lambda: dist.mean_tensors_over_ranks({"loss": torch.tensor(1.5)}),
            "AnyRankFlag": lambda: dist.AnyRankFlag().post(True)}[helper]
    with pytest.raises(_Reached):
        call()
    assert seen == [torch.device("meta")]


def test_any_rank_flag_answers_one_post_later_alone():
    flag = dist.AnyRankFlag()
    assert flag.result() is False  # nothing posted yet
    flag.post(False)
    assert flag.result() is False
    flag.post(True)
    assert flag.result() is True


def test_the_shm_op_build_is_announced_and_a_stale_lock_named(tmp_path, monkeypatch, capsys):
    """A first start says that it compiles (minutes of silence otherwise); a lock file left by a killed build,
    on which torch's JIT build would wait without end, is named with what to do."""
    import os
    import time

    from more_scale.dist import STALE_BUILD_LOCK_S, explain_shm_build

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert "building DeepSpeed's shared-memory op" in explain_shm_build()
    build = tmp_path / "py311_cpu" / "deepspeed_shm_comm"
    build.mkdir(parents=True)
    (build / "deepspeed_shm_comm.so").write_bytes(b"")
    assert explain_shm_build() is None  # built: nothing to say
    lock = build / "lock"
    lock.touch()
    assert explain_shm_build() is None  # a fresh lock: another rank is building it now
    old = time.time() - STALE_BUILD_LOCK_S - 5
    os.utime(lock, (old, old))
    assert f"waiting for {lock}" in explain_shm_build() and "if none is, delete it" in capsys.readouterr().err
