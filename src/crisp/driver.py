"""What the self-distillation and GRPO loops share around their own step.

- `ProblemStream`: the training problems in a seeded shuffle, epoch after epoch; its (epoch,
  position) is the data position a checkpoint saves.
- `TrainingRun`: the run directory's logs, resume from a checkpoint, the skip-or-step decision for
  a non-finite loss or gradient, and the end of every step: stop after too many consecutive skips,
  evaluate, log, checkpoint.

Under `accelerate launch` every rank keeps the same bookkeeping (the loss and gradient norm it
sees are already reduced over ranks, so all ranks skip, stop and evaluate together); only rank 0
writes logs and checkpoints, and every rank resumes from the same checkpoint.

A checkpoint holds everything the next step depends on (weights of every model passed in,
optimizer, LR schedule, RNG states, data position, skip counts and the loop's own state), so a run
resumed from checkpoint `s` computes steps s+1, s+2, ... exactly as an uninterrupted run does.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

import torch

from crisp import checkpoint
from crisp.data.problems import Problem
from crisp.data.tasks import Task, get_task
from accelerate import Accelerator

from crisp.config import dump_config
from crisp.distributed import autocast, load_rng, make_accelerator, save_checkpoint
from crisp.evaluate import evaluate
from crisp.metrics import MetricsLog, Timer, eval_metrics
from crisp.modeling import load_model, load_tokenizer, load_weights, prepare_for_training
from crisp.tracking import start_trackers


class TrainingStopped(RuntimeError):
    """The run cannot go on (too many consecutive non-finite steps); the message says what to do."""


def open_run(cfg) -> tuple[Accelerator, Path]:
    """How every training loop starts: the process's accelerator, the run directory holding the
    resolved config (rank 0 writes it), the experiment trackers, torch's thread count and seed."""
    out = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg.mixed_precision, cfg.report_to, out)
    out.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        dump_config(cfg, out / "config.yaml")
    # Continues an earlier run (a cheap look: a broken newest checkpoint is found out at resume).
    resuming = cfg.resume != "none" and (cfg.resume != "auto"
                                         or bool(checkpoint.complete_checkpoints(out / "checkpoints")))
    start_trackers(accelerator, cfg, out, resuming=resuming)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # Subnormal floats (weights and Adam moments decaying towards zero) run elementwise CPU kernels
    # ~30x slower; treating them as zero costs nothing measurable in accuracy.
    torch.set_flush_denormal(True)
    torch.manual_seed(cfg.seed)
    return accelerator, out


def trainable_model(cfg):
    """The model at `model.path` and its tokenizer, with LoRA and gradient checkpointing as
    configured, in training mode."""
    tokenizer = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    model = load_model(cfg.model.path, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
    model = prepare_for_training(model, gradient_checkpointing=cfg.model.gradient_checkpointing, lora=cfg.model.lora)
    model.train()
    return model, tokenizer


def training_problems(cfg) -> tuple[Task, list[Problem], list[Problem]]:
    """The task of `data.source`, its training problems, and the problems `eval.benchmark` evaluates on
    (bad data fails here, before any model is loaded)."""
    task = get_task(cfg.data.source)
    problems = task.train_problems(seed=cfg.seed, size=cfg.data.size, levels=cfg.data.levels, limit=cfg.data.limit)
    return task, problems, get_task(cfg.eval.benchmark).eval_problems(cfg.eval.limit) if cfg.eval else []


class ProblemStream:
    """Problems in a fresh seeded shuffle every epoch; `take` continues where the last call stopped."""

    def __init__(self, problems: Sequence[Problem], seed: int):
        self.problems = problems
        self.seed = seed
        self.epoch, self.position = 0, 0
        self.order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.problems)))
        random.Random(self.seed * 1000 + epoch).shuffle(order)
        return order

    def take(self, count: int) -> list[Problem]:
        batch = []
        while len(batch) < count:
            if self.position == len(self.order):
                self.epoch, self.position = self.epoch + 1, 0
                self.order = self._shuffled(self.epoch)
            batch.append(self.problems[self.order[self.position]])
            self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self.order = self._shuffled(self.epoch)


class TrainingRun:
    """The run directory and the per-step bookkeeping of one training loop.

    `models` are the modules a checkpoint holds, by name, unwrapped (not DDP): "model" (the trained
    one, saved with the tokenizer; with LoRA its adapters, a teacher adapter included) and any other
    whose weights cannot be rebuilt from the config (e.g. "teacher").
    """

    def __init__(self, cfg, *, accelerator, models: dict[str, torch.nn.Module], tokenizer, optimizer, scheduler,
                 stream: ProblemStream, builder, eval_problems: Sequence[Problem], eval_generator=None):
        self.cfg = cfg
        self.accelerator = accelerator
        self.main = accelerator.is_main_process  # only rank 0 writes files
        self.out = Path(cfg.output_dir)
        self.models, self.tokenizer = models, tokenizer
        self.optimizer, self.scheduler = optimizer, scheduler
        self.stream = stream
        self.builder, self.eval_problems = builder, eval_problems
        self.eval_generator = eval_generator  # the run's vLLM engine, or None: evaluations use HF generate
        self.metrics = MetricsLog(self.out / "metrics.jsonl", accelerator)  # also to the trackers
        self.rollouts = MetricsLog(self.out / "rollouts.jsonl")
        self.timer = Timer()
        self.skipped, self.consecutive_skips = 0, 0

    def precision(self):
        """bf16 autocast for forward passes when cfg.mixed_precision asks for it."""
        return autocast(self.cfg.mixed_precision, self.accelerator.device)

    def resume(self) -> tuple[int, dict | None]:
        """Load the checkpoint that cfg.resume names, if any: (its step, the loop's saved state).

        Log records past that step are dropped, so the resumed steps are written once; a fresh run
        (step 0) starts with empty logs.
        """
        step, loop_state = 0, None
        source = checkpoint.resolve_resume(self.cfg.resume, self.out)
        if source is not None:
            state = checkpoint.load_state(source)
            for name, model in self.models.items():
                load_weights(model, source / name)  # a LoRA model gets its adapters back
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.stream.load_state_dict(state["data"])
            self.skipped, self.consecutive_skips = state["skipped"], state["consecutive_skips"]
            load_rng(self.accelerator, state)
            step, loop_state = state["step"], state["loop"]
        if self.main:
            self.metrics.truncate_after(step)
            self.rollouts.truncate_after(step)
        return step, loop_state

    def count_step(self, stepped: bool) -> None:
        """Count a step that optim.step_if_finite skipped (non-finite loss or gradient norm)."""
        if stepped:
            self.consecutive_skips = 0
        else:
            self.skipped += 1
            self.consecutive_skips += 1

    def end_step(self, step: int, metrics: dict, samples: Sequence[dict], loop_state: dict, *,
                 always_log: bool = False) -> None:
        """After optimizer step `step`: evaluate and log when due (or `always_log`, e.g. the first
        step of a stage), stop after too many consecutive skipped steps (before saving, so the last
        checkpoint is a good one), checkpoint when due and at the last step (so that extending a
        finished run with resume=auto redoes nothing)."""
        cfg = self.cfg
        stop = self.consecutive_skips >= cfg.max_skipped_steps
        if cfg.eval and not stop and (step == cfg.max_steps or (cfg.eval.every and step % cfg.eval.every == 0)):
            with self.timer("eval"), self.precision():  # every rank evaluates a share of the problems
                _, summary = evaluate(self.models["model"], self.tokenizer, self.eval_problems, builder=self.builder,
                                      task=get_task(cfg.eval.benchmark),
                                      sampling=cfg.eval.sampling, k=cfg.eval.k, seed=cfg.seed,
                                      batch_size=cfg.eval.batch_size, progress=False, accelerator=self.accelerator,
                                      generator=self.eval_generator)
            metrics.update(eval_metrics(summary))
        if always_log or stop or step % cfg.log_every == 0 or step == cfg.max_steps or "eval/accuracy" in metrics:
            timings = self.timer.pop()
            if self.main:
                self.metrics.write(step, {**metrics, **timings})
                for sample in samples:
                    self.rollouts.write(step, sample)
        if stop:
            raise TrainingStopped(
                f"{self.consecutive_skips} consecutive steps had a non-finite loss or gradient (step {step}); "
                f"stopping. The last good checkpoint is in {self.out / 'checkpoints'}; "
                "lower optim.lr or check the data."
            )
        if cfg.save_every and (step % cfg.save_every == 0 or step == cfg.max_steps):
            self.save(step, loop_state)

    def save(self, step: int, loop_state: dict) -> None:
        models = {name: (model, self.tokenizer if name == "model" else None) for name, model in self.models.items()}
        save_checkpoint(self.accelerator, self.out / "checkpoints", step, models=models,
                        keep=self.cfg.keep_checkpoints, state={
                            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                            "data": self.stream.state_dict(), "skipped": self.skipped,
                            "consecutive_skips": self.consecutive_skips, "loop": loop_state})
