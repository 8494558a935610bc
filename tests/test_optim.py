"""crisp.optim.step_if_finite: clip, then step only when the loss and the gradient are finite."""

from __future__ import annotations

import math

import pytest
import torch

from crisp.optim import step_if_finite


def _model_with_grad(grad_value: float):
    model = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    model.weight.grad = torch.full_like(model.weight, grad_value)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_finite_step_clips_steps_and_clears():
    model, optimizer = _model_with_grad(2.0)
    grad_norm, stepped = step_if_finite(model, optimizer, loss=0.5, max_norm=1.0)
    assert stepped and grad_norm == pytest.approx(2.0 * math.sqrt(6))
    # clipped to norm 1: every entry becomes 1/sqrt(6); SGD moves the weight by lr times that
    assert torch.allclose(model.weight, torch.full((2, 3), 1.0 - 0.1 / math.sqrt(6)))
    assert model.weight.grad is None


def test_non_finite_loss_or_gradient_skips_the_step_but_clears():
    for loss, grad in ((float("nan"), 1.0), (1.0, float("inf"))):
        model, optimizer = _model_with_grad(grad)
        grad_norm, stepped = step_if_finite(model, optimizer, loss=loss, max_norm=1.0)
        assert not stepped
        assert torch.equal(model.weight, torch.ones(2, 3))
        assert model.weight.grad is None
        assert math.isfinite(grad_norm) == math.isfinite(grad)  # the norm is reported either way
