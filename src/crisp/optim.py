"""Optimizer and learning-rate schedule shared by every training method."""

from __future__ import annotations

import math

import torch

from crisp.config import OptimConfig


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, total_steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, warmup_steps=cfg.warmup_steps, total_steps=total_steps, schedule=cfg.schedule),
    )
    return optimizer, scheduler


def clip_and_check(model: torch.nn.Module, max_norm: float | None) -> float:
    """Clip gradients (when max_norm is set) and return the total norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
    return float(norm)


def step_if_finite(model: torch.nn.Module, optimizer, loss: float, max_norm: float | None) -> tuple[float, bool]:
    """Clip, then take the optimizer step unless the loss or the gradient norm is not finite.

    The gradients are cleared either way. Returns the norm before clipping and whether it stepped.
    """
    grad_norm = clip_and_check(model, max_norm)
    stepped = math.isfinite(loss) and math.isfinite(grad_norm)
    if stepped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, stepped
