"""Where the teacher's weights come from: frozen, refreshed every M steps, EMA, or live.

- frozen: a copy of the initial student, never updated.
- refresh: a copy hard-refreshed from the student every M optimizer steps (CRISP; M = 0: never).
- ema: a copy updated as t <- decay * t + (1 - decay) * s after every step.
- live: the current student itself, used under inference mode (no extra memory).

With LoRA (a peft student) there is one base model in memory and the teacher is an adapter on it:
- frozen: the adapters disabled, i.e. the base model (the initial student: LoRA starts at B = 0);
- refresh / ema: a second adapter "teacher", a snapshot of the student's adapter weights, copied
  every M steps or moved towards them (the EMA is over the A and B factors, not over B @ A);
- live: the student's own adapter.
The LM head is shared (LoRA never adapts it), so the teacher's head is the student's.

The teacher always runs in eval mode and without gradients.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from crisp.distributed import full_state_dict
from crisp.modeling import eval_mode, is_peft, output_head, response_hidden

TEACHER_ADAPTER = "teacher"


class Teacher:
    def __init__(self, student: torch.nn.Module, *, update: str, refresh_every: int = 0, ema_decay: float = 0.999):
        if update not in ("frozen", "refresh", "ema", "live"):
            raise ValueError(f"unknown teacher update {update!r}; use frozen, refresh, ema or live")
        self.update = update
        self.refresh_every = refresh_every
        self.ema_decay = ema_decay
        self.refreshes = 0
        self.adapter: str | None = None  # which adapter of a peft student the teacher runs with
        if is_peft(student):
            self.model = student
            if update == "frozen":
                self.adapter = "__base__"  # peft's name for "no adapter" in a forward pass
            elif update in ("refresh", "ema"):
                self.adapter = TEACHER_ADAPTER
                student.add_adapter(TEACHER_ADAPTER, student.peft_config["default"])
                self._copy_adapter(student)
        elif update == "live":
            self.model = student
        else:
            self.model = copy.deepcopy(student).eval().requires_grad_(False)

    @property
    def owns_weights(self) -> bool:
        """Whether the teacher is a separate model that a checkpoint must hold (a teacher adapter is
        saved with the student's adapters)."""
        return self.update != "live" and self.adapter is None

    @property
    def head(self) -> torch.nn.Module:
        return output_head(self.model)

    @torch.inference_mode()  # not even version counters: the result only ever enters the loss as a constant
    def hidden(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
        """The teacher's final hidden states at the response positions (see modeling.response_hidden)."""
        extra = {"adapter_names": [self.adapter] * len(prompts)} if self.adapter else {}
        with eval_mode(self.model):
            return response_hidden(self.model, prompts, responses, pad_id, **extra)  # (N, H)

    def _adapter_pairs(self, student: torch.nn.Module):
        """(teacher adapter tensor, student adapter tensor) for every LoRA weight."""
        params = dict(student.named_parameters())
        for name, teacher_param in params.items():
            if f".{TEACHER_ADAPTER}." in name:
                yield teacher_param, params[name.replace(f".{TEACHER_ADAPTER}.", ".default.")]

    @torch.no_grad()
    def _copy_adapter(self, student: torch.nn.Module) -> None:
        for t, s in self._adapter_pairs(student):
            t.requires_grad_(False)
            t.copy_(s)

    @torch.no_grad()
    def after_step(self, step: int, student: torch.nn.Module) -> bool:
        """Apply the update rule after optimizer step `step` (1-based); True when the weights changed."""
        if self.update == "refresh" and self.refresh_every and step % self.refresh_every == 0:
            if self.adapter:
                self._copy_adapter(student)
            else:
                self.model.load_state_dict(full_state_dict(student))
            self.refreshes += 1
            return True
        if self.update == "ema":
            if self.adapter:
                pairs = self._adapter_pairs(student)
            else:
                weights = full_state_dict(student)
                pairs = ((t, weights[name]) for name, t in self.model.named_parameters())
            for t, s in pairs:
                t.lerp_(s.detach(), 1.0 - self.ema_decay)
            return True
        return False
