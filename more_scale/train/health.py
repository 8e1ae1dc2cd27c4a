"""Divergence: a run whose loss or gradients stay non-finite stops with an error, never a success.

Every step, on every rank, the loss's finiteness is folded into two device counters (no host sync):
the current run of non-finite steps and the total. DeepSpeed skips an optimizer step whose gradients
are non-finite on any rank (its overflow check all-reduces the flag, so every rank skips alike); its
`skipped_steps` counter is read on the host. At log steps and before every checkpoint the counters
are all-reduced through `dist` (the ranks agree) and judged: `limit` non-finite or skipped steps in a
row is a divergence. No checkpoint is written while the latest step was non-finite, so `latest` never
points past the divergence.
"""

from __future__ import annotations

import torch

from more_scale import dist

EXIT_DIVERGED = 3  # the exit status of a diverged run (1 is any other error, 75 a requeue)


class Diverged(RuntimeError):
    """Raised on every rank alike when training diverged; entry points turn it into EXIT_DIVERGED."""


class HealthWatch:
    def __init__(self, limit: int, device: torch.device):
        self.limit = limit
        self.streak = torch.zeros((), dtype=torch.int64, device=device)  # non-finite losses in a row, now
        self.total = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped_at_start: int | None = None
        self.skip_streak = 0  # optimizer steps DeepSpeed skipped in a row (host counter)
        self._last_skipped = 0

    def after_step(self, loss: torch.Tensor, skipped_steps: int) -> None:
        """Fold one optimizer step in: `loss` (device scalar), DeepSpeed's skipped-step counter (host int)."""
        bad = ~torch.isfinite(loss.detach())
        self.streak = torch.where(bad, self.streak + 1, torch.zeros_like(self.streak))
        self.total += bad.to(torch.int64)
        if self.skipped_at_start is None:
            self.skipped_at_start = self._last_skipped = skipped_steps
        self.skip_streak = self.skip_streak + 1 if skipped_steps > self._last_skipped else 0
        self._last_skipped = skipped_steps

    def status(self) -> dict[str, int]:
        """The counters, the worst over ranks (one all-reduce; a host-device sync: log and save steps only)."""
        streak, total, skip_streak = dist.max_over_ranks([int(self.streak), int(self.total), self.skip_streak])
        return {"nonfinite_streak": streak, "nonfinite_steps": total, "skipped_streak": skip_streak,
                "skipped_steps": self._last_skipped - (self.skipped_at_start or 0)}

    def check(self, step: int, losses: dict[str, float] | None = None) -> dict[str, int]:
        """Raise Diverged when `limit` steps in a row were non-finite or skipped; returns the status."""
        status = self.status()
        if max(status["nonfinite_streak"], status["skipped_streak"]) >= self.limit:
            terms = ", ".join(f"{k} {v:.4g}" for k, v in sorted((losses or {}).items()) if k.startswith("loss"))
            raise Diverged(
                f"training diverged at step {step}: {status['nonfinite_streak']} steps in a row with a non-finite loss "
                f"and {status['skipped_streak']} optimizer steps in a row skipped for non-finite gradients "
                f"(train.max_bad_steps={self.limit}); last logged loss terms: {terms or 'none'}; "
                f"{status['nonfinite_steps']} non-finite steps in all. No checkpoint was written after the divergence: "
                f"lower train.lr or check the data, then resume from the last checkpoint.")
        return status

    def healthy_now(self) -> bool:
        """The latest step was finite on every rank (a host-device sync: call before a save)."""
        status = self.status()
        return status["nonfinite_streak"] == 0 and status["skipped_streak"] == 0
