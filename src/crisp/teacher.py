"""Where the teacher's weights come from: frozen, refreshed every M steps, EMA, or live.

- frozen: a copy of the initial student, never updated.
- refresh: a copy hard-refreshed from the student every M optimizer steps (CRISP; M = 0: never).
- ema: a copy updated as t <- decay * t + (1 - decay) * s after every step.
- live: the current student itself, used under no_grad (no extra memory).
"""

from __future__ import annotations

import copy

import torch


class Teacher:
    def __init__(self, student: torch.nn.Module, *, update: str, refresh_every: int = 0, ema_decay: float = 0.999):
        if update not in ("frozen", "refresh", "ema", "live"):
            raise ValueError(f"unknown teacher update {update!r}; use frozen, refresh, ema or live")
        self.update = update
        self.refresh_every = refresh_every
        self.ema_decay = ema_decay
        self.refreshes = 0
        if update == "live":
            self.model = student
        else:
            self.model = copy.deepcopy(student).eval().requires_grad_(False)

    @property
    def owns_weights(self) -> bool:
        """Whether the teacher is a separate copy that a checkpoint must hold."""
        return self.update != "live"

    @torch.no_grad()
    def after_step(self, step: int, student: torch.nn.Module) -> bool:
        """Apply the update rule after optimizer step `step` (1-based); True when the weights changed."""
        if self.update == "refresh" and self.refresh_every and step % self.refresh_every == 0:
            self.model.load_state_dict(student.state_dict())
            self.refreshes += 1
            return True
        if self.update == "ema":
            for t, s in zip(self.model.parameters(), student.parameters()):
                t.lerp_(s.detach(), 1.0 - self.ema_decay)
            return True
        return False
