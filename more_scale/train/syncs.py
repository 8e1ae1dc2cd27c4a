"""Host-device synchronisations, counted on any device (a CPU included) by the aten ops that force one on CUDA.

A GPU step that the host waits on mid-way (`.item()`, `bool(tensor)`, a boolean-mask index, `nonzero`) stops
queueing work until the device catches up: the GPU idles while Python runs. On a CPU nothing waits, so such
a bug is invisible there, but the op still passes through the dispatcher: `SyncCounter` (a
TorchDispatchMode) counts every op that would block the host on CUDA, by the innermost caller outside
torch ("more_scale/loss.py:72", "deepspeed/runtime/utils.py:233"). tests/test_syncs.py holds our code to
zero per plain training step; train.sync_audit_steps puts the count of a real run (a GPU's too) into
metrics.jsonl.
"""

from __future__ import annotations

import collections
import contextlib
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# ops whose result size or value the host needs before it can go on
ALWAYS_SYNC = {aten._local_scalar_dense.default, aten.nonzero.default, aten.nonzero_static.default,
               aten.masked_select.default, aten.equal.default, aten.is_nonzero.default,
               aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
               aten.repeat_interleave.Tensor, aten.bincount.default, aten.histc.default}
# index / index_put with a boolean mask: the number of selected elements sizes the result
MASK_INDEXED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
_TORCH_DIR = str(Path(torch.__file__).parent)
_THIS = __file__


def _is_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


def _site() -> str:
    """file:line of the innermost caller outside torch and this module, its path from the package folder."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(_TORCH_DIR) and name != _THIS and "<frozen" not in name:
            parts = Path(name).parts
            for package in ("more_scale", "deepspeed", "transformers", "peft"):
                if package in parts:
                    return f"{'/'.join(parts[parts.index(package):])}:{frame.f_lineno}"
            return f"{Path(name).name}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


class SyncCounter(TorchDispatchMode):
    """`with SyncCounter() as c: ...`; then `c.sites` counts sync-forcing ops by caller."""

    def __init__(self):
        super().__init__()
        self.sites: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in ALWAYS_SYNC or (func in MASK_INDEXED and _is_bool_index(args)):
            self.sites[f"{_site()} ({func.__name__.split('.')[0]})"] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def ours(self) -> dict[str, int]:
        """The sites in this package."""
        return {site: n for site, n in self.sites.items() if site.startswith("more_scale/")}


class SyncAudit:
    """Counts the syncs of training steps [first, first + steps): `with audit.step(n): <step n>`; `result()`
    returns the per-step figures once, after the last audited step (else None)."""

    def __init__(self, steps: int, first: int):
        self.steps, self.first = steps, first
        self.counter = SyncCounter()
        self.audited = 0
        self.reported = False

    @contextlib.contextmanager
    def step(self, step: int):
        if not self.first <= step < self.first + self.steps:
            yield
            return
        with self.counter:
            yield
        self.audited += 1

    def result(self) -> dict | None:
        if self.reported or self.audited < self.steps or self.steps == 0:
            return None
        self.reported = True
        per_step = {site: n / self.steps for site, n in self.counter.sites.most_common()}
        return {"host_syncs_per_step": self.counter.total / self.steps,
                "host_syncs_ours_per_step": sum(self.counter.ours().values()) / self.steps, "host_syncs": per_step}
