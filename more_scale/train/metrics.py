"""Rank-0 metrics: one JSON object per logged step in metrics.jsonl, and TensorBoard scalars."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLogger:
    def __init__(self, output_dir: str | Path, rank: int):
        self.enabled = rank == 0
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.jsonl = open(Path(output_dir) / "metrics.jsonl", "a")
        self.tensorboard = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        for name, value in values.items():
            if isinstance(value, (int, float)):
                self.tensorboard.add_scalar(name, value, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tensorboard.close()
