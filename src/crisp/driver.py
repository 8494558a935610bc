"""The one training driver every method runs on (crisp.methods).

A method builds what it trains (the model, its data stream, a teacher or reference, a rollout
engine) and owns its step: one function of typed inputs that samples, computes its loss and asks the
`Trainer` for the optimizer update. The driver owns the run around the steps:

  open      the run directory with the resolved config, trackers, threads, seed
  prepare   optimizer and LR schedule, the accelerate wrapper (DDP / FSDP)
  resume    weights of every model a checkpoint holds, optimizer, schedule, RNG states, the data
            position, the skip counts and the method's own state
  steps     the method's step; a non-finite loss or gradient skips the optimizer step (counted),
            too many in a row stop the run before its checkpoint is written
  after     evaluate when due, log, checkpoint when due and at the last step
  end       the final model (with the config that built it), trackers closed

Under `accelerate launch` every rank keeps the same bookkeeping (the loss and gradient norm it sees
are already reduced over ranks, so all ranks skip, stop and evaluate together); only rank 0 writes
logs and checkpoints, and every rank resumes from the same checkpoint.

A checkpoint holds everything the next step depends on, so a run resumed from checkpoint `s`
computes steps s+1, s+2, ... exactly as an uninterrupted run does.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Protocol, TypeVar

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from crisp import checkpoint
from crisp.config import ConfigError, EvalConfig, RunConfig, dump_config
from crisp.data.problems import Problem
from crisp.data.tasks import Task, get_task
from crisp.distributed import autocast, load_rng, make_accelerator, prepare, save_checkpoint, save_final, shard
from crisp.evaluate import GradedRollout, evaluate, score_rollouts
from crisp.grading import get_grader
from crisp.metrics import MetricsLog, Timer, eval_metrics
from crisp.modeling import load_model, load_tokenizer, load_weights, prepare_for_training
from crisp.optim import build_optimizer, step_if_finite
from crisp.prompts import PromptBuilder
from crisp.rollout import Generator
from crisp.rollout_vllm import build_generator, sync_weights
from crisp.tracking import finish_trackers, start_trackers

T = TypeVar("T")


# What a checkpoint's state.pt holds, by version: 2 is the one driver's (optimizer, scheduler, data,
# skip counts, the method's own state); 1, the separate loops' before it.
CHECKPOINT_FORMAT = 2


class TrainingStopped(RuntimeError):
    """The run cannot go on (too many consecutive non-finite steps); the message says what to do."""


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of the data order of one epoch (every method's stream)."""
    return seed * 1000 + epoch


class EpochStream(Generic[T]):
    """Items epoch after epoch, each epoch's order drawn from its own seeded RNG; `take` continues
    where the last call stopped, and (epoch, position) is the data position a checkpoint saves."""

    def __init__(self, make_epoch: Callable[[random.Random], Sequence[T]], seed: int):
        self.make_epoch, self.seed = make_epoch, seed
        self.epoch, self.position = 0, 0
        self.items = make_epoch(random.Random(epoch_seed(seed, 0)))

    def take(self, count: int) -> list[T]:
        batch = []
        while len(batch) < count:
            if self.position == len(self.items):
                self.epoch, self.position = self.epoch + 1, 0
                self.items = self.make_epoch(random.Random(epoch_seed(self.seed, self.epoch)))
            batch.append(self.items[self.position])
            self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self.items = self.make_epoch(random.Random(epoch_seed(self.seed, self.epoch)))


def problem_stream(problems: Sequence[Problem], seed: int) -> EpochStream[Problem]:
    """The training problems in a fresh seeded shuffle every epoch."""

    def shuffled(rng: random.Random) -> list[Problem]:
        order = list(range(len(problems)))
        rng.shuffle(order)
        return [problems[i] for i in order]

    return EpochStream(shuffled, seed)


@dataclass
class StepResult:
    """What one training step reports to the driver."""

    metrics: dict[str, float]  # the method's figures: train/loss, rollout/..., its own
    samples: list[dict] = field(default_factory=list)  # records for rollouts.jsonl
    progress: dict[str, str] = field(default_factory=dict)  # the progress bar's postfix
    always_log: bool = False  # log this step whatever log_every says (e.g. the first step of a stage)
    tokens: int | None = None  # tokens the step processed (prompts and responses), for train/tokens_per_s


class Evaluation(Protocol):
    """An in-training evaluation: its metrics, every `every` training steps (0: only at the end) and
    after the last one."""

    every: int

    def __call__(self, trainer: Trainer) -> dict[str, float]: ...


class BenchmarkEvaluation:
    """eval.benchmark at eval.every steps and at the end, sampled as `crisp eval` would (each rank a
    share of the problems), with the run's prompt mode and, when there is one, its vLLM engine."""

    def __init__(
        self,
        cfg: EvalConfig,
        problems: Sequence[Problem],
        *,
        seed: int,
        builder: PromptBuilder,
        generator: Generator | None = None,
    ):
        self.cfg, self.problems, self.seed, self.builder = cfg, problems, seed, builder
        self.every = cfg.every
        self.task = get_task(cfg.benchmark)
        self.generator = generator  # None: HF generate

    def __call__(self, trainer: Trainer) -> dict[str, float]:
        with trainer.precision():
            _, summary = evaluate(
                trainer.unwrapped,
                self.builder.tokenizer,
                self.problems,
                builder=self.builder,
                task=self.task,
                sampling=self.cfg.sampling,
                k=self.cfg.k,
                seed=self.seed,
                batch_size=self.cfg.batch_size,
                progress=False,
                accelerator=trainer.accelerator,
                generator=self.generator,
            )
        return eval_metrics(summary)


class Method:
    """A training method, as the driver sees it. A subclass (one file in crisp.methods, with its
    config) builds in `__init__` what it trains and sets the attributes below, may build more in
    `start` once the model sits on its device, and `step` is its step."""

    cfg: RunConfig
    label: str  # the progress bar's
    model: torch.nn.Module  # the trained model, unwrapped
    tokenizer: object
    stream: EpochStream
    # the modules a checkpoint holds, by name, unwrapped: "model" (saved with the tokenizer; with LoRA
    # its adapters, a teacher adapter included) and any other whose weights the config cannot rebuild
    checkpointed: dict[str, torch.nn.Module]
    evaluation: Evaluation | None = None
    generator: Generator | None = None  # what samples the rollouts (a vLLM engine holds its own weights)

    def start(self, trainer: Trainer) -> None:
        """Called once the optimizer exists and the model is wrapped and on its device, before resume."""

    def step(self, step: int, trainer: Trainer) -> StepResult:
        """Training step `step` (0-based), its optimizer update(s) included (`trainer.update`)."""
        raise NotImplementedError

    def weights_changed(self) -> None:
        """After an optimizer step and after a resume: a rollout engine with its own copy of the
        weights gets the new ones."""
        sync_weights(self.generator, self.model)

    def state_dict(self) -> dict:
        """What the method itself must carry across a resume (e.g. the teacher's refresh count)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class Trainer:
    """What a step needs from the driver: the wrapped model every forward pass goes through, the
    timer, the precision context, and the optimizer update."""

    accelerator: Accelerator
    model: torch.nn.Module  # wrapped (DDP / FSDP)
    unwrapped: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    grad_clip: float | None
    mixed_precision: str
    stepped: bool = False  # whether an optimizer step was taken since the driver last looked
    timer: Timer = field(default_factory=Timer)
    skipped: int = 0
    consecutive_skips: int = 0

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process  # only rank 0 writes files

    def precision(self):
        """bf16 autocast for forward passes when mixed_precision asks for it."""
        return autocast(self.mixed_precision, self.accelerator.device)

    def update(self, loss: float | None) -> float:
        """One optimizer step on the accumulated gradients, skipped (and counted) when `loss` or the
        gradient norm is not finite; `loss` None: nothing to learn from this time, no step and no
        skip. The LR schedule advances either way. Returns the gradient norm before clipping."""
        with self.timer("step"):
            grad_norm = math.nan
            if loss is not None:
                grad_norm, stepped = step_if_finite(self.unwrapped, self.optimizer, loss, self.grad_clip)
                self.skipped += not stepped
                self.consecutive_skips = 0 if stepped else self.consecutive_skips + 1
                self.stepped |= stepped
            self.scheduler.step()
        return grad_norm


def open_run(cfg: RunConfig) -> tuple[Accelerator, Path, tuple[Path, dict] | None]:
    """The process's accelerator, the run directory holding the resolved config (rank 0 writes it),
    the checkpoint to resume from with its state (checkpoint.resume_point: a run that must not start
    fails here, before anything is built), the experiment trackers, torch's thread count and seed."""
    out = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg.mixed_precision, cfg.report_to, out)
    resume_from = checkpoint.resume_point(cfg.resume, out)
    if resume_from is not None and resume_from[1].get("format", 1) != CHECKPOINT_FORMAT:
        source, version = resume_from[0], resume_from[1].get("format", 1)
        raise ConfigError(
            f"resume: {source} holds a checkpoint of format {version}, written by an earlier crisp; this one "
            f"reads format {CHECKPOINT_FORMAT}. Start a new run (another output_dir), or finish this one with "
            "the crisp that wrote it"
        )
    out.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        dump_config(cfg, out / "config.yaml")
    start_trackers(accelerator, cfg, out, resuming=resume_from is not None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # Subnormal floats (weights and Adam moments decaying towards zero) run elementwise CPU kernels
    # ~30x slower; treating them as zero costs nothing measurable in accuracy.
    torch.set_flush_denormal(True)
    torch.manual_seed(cfg.seed)
    return accelerator, out, resume_from


def trainable_model(cfg: RunConfig, built: tuple | None = None):
    """The model at `model.path` and its tokenizer (or `built`: a model and tokenizer made another
    way), with LoRA and gradient checkpointing as configured, in training mode."""
    if built is None:
        tokenizer = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
        model = load_model(cfg.model.path, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
    else:
        model, tokenizer = built
    model = prepare_for_training(model, gradient_checkpointing=cfg.model.gradient_checkpointing, lora=cfg.model.lora)
    model.train()
    return model, tokenizer


def training_problems(cfg: RunConfig) -> tuple[Task, list[Problem], list[Problem]]:
    """The task of `data.source`, its training problems, and the problems `eval.benchmark` evaluates on
    (bad data fails here, before any model is loaded)."""
    task = get_task(cfg.data.source)
    problems = task.train_problems(seed=cfg.seed, size=cfg.data.size, levels=cfg.data.levels, limit=cfg.data.limit)
    return task, problems, get_task(cfg.eval.benchmark).eval_problems(cfg.eval.limit) if cfg.eval else []


class RolloutMethod(Method):
    """What the methods that train on their own rollouts (selfdistill, grpo) build alike: the task and
    its problems in a stream, the model at model.path, the prompt builder of the run's prompt mode;
    at `start`, the rollout engine (long enough for the rollouts and the evaluation: a vLLM engine
    sizes its KV cache from the device memory the models leave) and eval.benchmark's evaluation on
    the same engine. `generate_and_grade` is their shared first half of a step."""

    def __init__(
        self,
        cfg: RunConfig,
        accelerator: Accelerator,
        *,
        generation_batch_size: int = 256,
    ):
        self.cfg, self.rollout = cfg, cfg.rollout
        self.task, problems, self.eval_problems = training_problems(cfg)  # bad data fails before any model loads
        self.grader = get_grader(self.task.grader)
        self.model, self.tokenizer = trainable_model(cfg)
        self.checkpointed = {"model": self.model}
        self.builder = PromptBuilder.from_config(self.tokenizer, cfg.prompt)
        self.stream = problem_stream(problems, cfg.seed)
        self.generation_batch_size = generation_batch_size

    def start(self, trainer: Trainer) -> None:
        cfg, rollout = self.cfg, self.rollout
        self.generator = build_generator(
            rollout.backend,
            rollout.vllm,
            self.model,
            self.tokenizer,
            batch_size=self.generation_batch_size,
            trust_remote_code=cfg.model.trust_remote_code,
            max_new_tokens=max(rollout.max_new_tokens, cfg.eval.sampling.max_new_tokens if cfg.eval else 0),
        )
        if cfg.eval:
            self.evaluation = BenchmarkEvaluation(
                cfg.eval,
                self.eval_problems,
                seed=cfg.seed,
                builder=self.builder,
                generator=self.generator if rollout.backend == "vllm" else None,
            )

    def generate_and_grade(
        self, batch: Sequence[Problem], builder: PromptBuilder, seed: int, trainer: Trainer, **sampling
    ) -> list[GradedRollout]:
        """This rank's slice of the prompts of `batch`: rollout.n samples of each (`sampling`: e.g.
        max_new_tokens), graded against the problem's answer. The generator keeps prompt order, so
        the samples of one prompt are contiguous."""
        mine = shard(len(batch), trainer.accelerator)
        with trainer.timer("generate"), trainer.precision():
            rollouts = self.generator.generate(
                [builder.student_ids(batch[i]) for i in mine],
                self.rollout,
                seed=seed,
                first_index=mine.start,
                **sampling,
            )
        with trainer.timer("grade"):
            return score_rollouts(batch, rollouts, self.grader)


class Training:
    """One training run of `cfg` (the method its `method` names, crisp.methods): `Training(cfg).run()`.

    `options` go to the method (e.g. GRPO's `reward`). Between construction and `run`, `method`
    holds what the method built and `trainer` the optimizer and the wrapped model."""

    def __init__(self, cfg: RunConfig, **options):
        from crisp.methods import method_class

        self.cfg = cfg
        self.accelerator, self.out, self.resume_from = open_run(cfg)
        self.method: Method = method_class(cfg.method)(cfg, self.accelerator, **options)
        model = self.method.model
        optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.optimizer_steps)
        wrapped, optimizer = prepare(self.accelerator, model, optimizer, checkpoints=cfg.uses_checkpoints)
        self.trainer = Trainer(
            self.accelerator,
            wrapped,
            model,
            optimizer,
            scheduler,
            cfg.optim.grad_clip,
            cfg.mixed_precision,
        )
        self.method.start(self.trainer)
        self.metrics = MetricsLog(self.out / "metrics.jsonl", self.accelerator)  # also to the trackers
        self.rollouts = MetricsLog(self.out / "rollouts.jsonl")
        self.step = 0
        self.window_tokens, self.window_seconds = 0, 0.0  # for train/tokens_per_s since the last record

    def run(self) -> Path:
        """Train to cfg.max_steps (resuming as cfg.resume says); returns the final model's directory."""
        self.train_steps()
        return self.save_final()

    def train_steps(self) -> None:
        """Resume as cfg.resume says, then run the steps up to cfg.max_steps."""
        cfg, method, trainer = self.cfg, self.method, self.trainer
        self.resume()
        bar = tqdm(
            total=cfg.max_steps, initial=self.step, desc=method.label, dynamic_ncols=True, disable=not trainer.main
        )
        while self.step < cfg.max_steps:
            start = time.perf_counter()
            result = method.step(self.step, trainer)
            if trainer.stepped:  # once a step, whatever its optimizer steps: the next rollouts use the new weights
                with trainer.timer("step"):
                    method.weights_changed()
                trainer.stepped = False
            self.window_seconds += time.perf_counter() - start
            self.window_tokens += result.tokens or 0
            self.step += 1
            bar.update(1)
            bar.set_postfix(result.progress)
            self.end_step(result)
        bar.close()

    def save_final(self) -> Path:
        """The final model in output_dir/model (rank 0 writes it), with the config that built it."""
        trainer, method = self.trainer, self.method
        final = self.out / "model"
        save_final(self.accelerator, trainer.model, method.tokenizer, final)
        if trainer.main:
            dump_config(self.cfg, final / "crisp_config.yaml")  # marks the model complete, and what built it
        finish_trackers(self.accelerator)
        return final

    def resume(self) -> None:
        """Load the checkpoint that cfg.resume named (found by open_run), if any. Log records past its step are dropped,
        so the resumed steps are written once; a fresh run (step 0) starts with empty logs."""
        trainer, method = self.trainer, self.method
        if self.resume_from is not None:
            (source, state), self.resume_from = self.resume_from, None  # (the state is not kept once loaded)
            for name, model in method.checkpointed.items():
                load_weights(model, source / name)  # a LoRA model gets its adapters back
            trainer.optimizer.load_state_dict(state["optimizer"])
            trainer.scheduler.load_state_dict(state["scheduler"])
            method.stream.load_state_dict(state["data"])
            trainer.skipped, trainer.consecutive_skips = state["skipped"], state["consecutive_skips"]
            load_rng(self.accelerator, state)
            method.load_state_dict(state["method"])
            self.step = state["step"]
            method.weights_changed()  # (a new engine starts with the model's weights)
        if trainer.main:
            self.metrics.truncate_after(self.step)
            self.rollouts.truncate_after(self.step)

    def end_step(self, result: StepResult) -> None:
        """After training step `self.step`: evaluate and log when due, stop after too many consecutive
        skipped steps (before saving, so the last checkpoint is a good one), checkpoint when due and
        at the last step (so that extending a finished run with resume=auto redoes nothing)."""
        cfg, step, trainer, evaluation = self.cfg, self.step, self.trainer, self.method.evaluation
        stop = trainer.consecutive_skips >= cfg.max_skipped_steps
        metrics = {
            **result.metrics,
            "train/lr": trainer.scheduler.get_last_lr()[0],
            "train/skipped_steps": trainer.skipped,
        }
        evaluated = (
            evaluation is not None
            and not stop
            and (step == cfg.max_steps or bool(evaluation.every and step % evaluation.every == 0))
        )
        if evaluated:
            with trainer.timer("eval"):  # every rank evaluates (a share of the problems)
                metrics.update(evaluation(trainer))
        if result.always_log or stop or evaluated or step % cfg.log_every == 0 or step == cfg.max_steps:
            if self.window_tokens:
                metrics["train/tokens_per_s"] = self.window_tokens / self.window_seconds
            self.window_tokens, self.window_seconds = 0, 0.0
            metrics.update(trainer.timer.pop())
            if trainer.main:
                self.metrics.write(step, metrics)
                for sample in result.samples:
                    self.rollouts.write(step, sample)
        if stop:
            raise TrainingStopped(
                f"{trainer.consecutive_skips} consecutive steps had a non-finite loss or gradient (step {step}); "
                f"stopping. The last good checkpoint is in {self.out / 'checkpoints'}; "
                "lower optim.lr or check the data."
            )
        if cfg.save_every and (step % cfg.save_every == 0 or step == cfg.max_steps):
            self.save()

    def save(self) -> None:
        trainer, method = self.trainer, self.method
        models = {
            name: (model, method.tokenizer if name == "model" else None) for name, model in method.checkpointed.items()
        }
        save_checkpoint(
            self.accelerator,
            self.out / "checkpoints",
            self.step,
            models=models,
            keep=self.cfg.keep_checkpoints,
            state={
                "optimizer": trainer.optimizer.state_dict(),
                "scheduler": trainer.scheduler.state_dict(),
                "data": method.stream.state_dict(),
                "skipped": trainer.skipped,
                "consecutive_skips": trainer.consecutive_skips,
                "format": CHECKPOINT_FORMAT,
                "method": method.state_dict(),
            },
        )


def train(cfg: RunConfig, **options) -> Path:
    """Run `cfg` to the end; returns the directory of the final model (output_dir/model)."""
    return Training(cfg, **options).run()
