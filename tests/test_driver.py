"""The driver's own parts: the method registry (one module a method), the optimizer update that
skips non-finite steps, and the epoch stream's order."""

from __future__ import annotations

import math
import random

import pytest
import torch

from crisp.config import ConfigError, OptimConfig, validate
from crisp.distributed import make_accelerator
from crisp.driver import EpochStream, Method, Trainer
from crisp.methods import config_classes, method_class
from crisp.optim import build_optimizer


def test_every_method_module_declares_its_config_and_its_method():
    classes = config_classes()
    assert set(classes) == {"sft", "selfdistill", "grpo"}
    for name, config in classes.items():
        assert config.model_fields["method"].default == name
        assert issubclass(method_class(name), Method)
    with pytest.raises(ConfigError, match="method: must be one of grpo, selfdistill, sft"):
        validate({"method": "dpo", "output_dir": "x", "max_steps": 1, "model": {"path": "m"}})


def trainer_of(model: torch.nn.Module) -> Trainer:
    optimizer, scheduler = build_optimizer(model, OptimConfig(lr=0.1, warmup_steps=4), total_steps=10)
    return Trainer(make_accelerator(), model, model, optimizer, scheduler, grad_clip=1.0, mixed_precision="no")


def test_the_update_steps_skips_a_non_finite_step_and_steps_nothing_without_a_loss():
    model = torch.nn.Linear(3, 1)
    trainer = trainer_of(model)
    before = [p.detach().clone() for p in model.parameters()]

    def backward(scale: float) -> float:
        loss = model(torch.ones(1, 3)).sum() * scale
        loss.backward()
        return float(loss.detach())

    assert math.isnan(trainer.update(None))  # nothing to learn from: no step, not a failure
    assert (trainer.skipped, trainer.consecutive_skips) == (0, 0)
    assert not math.isfinite(trainer.update(backward(math.inf)))  # an infinite loss and gradient
    assert not math.isfinite(trainer.update(backward(math.nan)))
    assert (trainer.skipped, trainer.consecutive_skips) == (2, 2)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # skipped: the weights stayed
    assert all(p.grad is None for p in model.parameters())  # and the bad gradients were dropped
    grad_norm = trainer.update(backward(1.0))
    assert math.isfinite(grad_norm) and trainer.consecutive_skips == 0
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert trainer.skipped == 2 and trainer.scheduler.last_epoch == 4  # the schedule advanced on every call


def test_the_epoch_stream_reshuffles_every_epoch_and_resumes_mid_epoch():
    stream = EpochStream(lambda rng: rng.sample(range(5), 5), seed=3)
    first_two_epochs = stream.take(10)
    assert sorted(first_two_epochs[:5]) == sorted(first_two_epochs[5:]) == list(range(5))
    assert first_two_epochs[:5] == random.Random(3000).sample(range(5), 5)
    assert first_two_epochs[5:] == random.Random(3001).sample(range(5), 5)
    stream = EpochStream(lambda rng: rng.sample(range(5), 5), seed=3)
    stream.take(7)
    resumed = EpochStream(lambda rng: rng.sample(range(5), 5), seed=3)
    resumed.load_state_dict(stream.state_dict())
    assert resumed.take(6) == stream.take(6)
