"""Self-distillation (method: selfdistill): CRISP (a "be concise" teacher) and OPSD (a
reference-solution teacher).

One step, top to bottom:
  generate  student rollouts from the plain prompts (n per prompt)
  grade     every rollout (logged; the rollout filter may use it)
  teacher   forward on (teacher prompt + the same response tokens), no grad
  loss      divergence per response token between student and teacher at the same response
            positions, summed and divided by the number of response tokens in the whole batch
            (so micro-batching gives the same update as one big batch)
  step      clip, optimizer step (skipped, and counted, when the loss or gradient is not finite)
  refresh   the teacher's update rule (frozen / refresh every M / EMA / live)

Run under `accelerate launch`, the ranks share each step as crisp.distributed describes: each
generates and grades a slice of the prompts, all hold every rollout, each trains on a slice of
the kept rollouts with the loss divided by the response tokens of the whole batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from accelerate import Accelerator
from pydantic import Field, model_validator

from crisp.config import (
    PositiveFloat,
    PositiveInt,
    Probability,
    RolloutConfig,
    RunConfig,
    Strict,
    training_engine_lengths,
)
from crisp.data.problems import Problem
from crisp.distributed import gather, grad_sync, micro_batches, reduce_sum
from crisp.driver import RolloutMethod, StepResult, Trainer
from crisp.evaluate import rollout_metrics
from crisp.losses import DivergenceSpec, divergence_sum
from crisp.modeling import output_head, response_hidden
from crisp.prompts import resolve_instruction
from crisp.rollout import Rollout, rollout_seed
from crisp.teacher import Teacher


class TeacherConfig(Strict):
    instruction: str | None = "v1"  # preset name, custom text, or null
    reference_solution: bool = False  # OPSD: show the teacher a verified solution
    update: Literal["frozen", "refresh", "ema", "live"] = "refresh"
    refresh_every: Annotated[int, Field(ge=0)] = 50  # M; 0 = never (same as frozen)
    ema_decay: Probability = 0.999
    percent: PositiveInt = 50  # for the "percent" instruction preset
    words: PositiveInt = 100  # for the "word_limit" preset

    @model_validator(mode="after")
    def _has_context(self) -> TeacherConfig:
        if not self.instruction and not self.reference_solution:
            raise ValueError("the teacher needs an instruction, a reference solution, or both")
        return self


class LossConfig(Strict):
    divergence: Literal["reverse_kl", "forward_kl", "jsd", "mixed", "sampled_token"] = "reverse_kl"
    beta: Probability = 0.5
    forward_weight: Annotated[float, Field(ge=0)] = 0.5
    term_clip: PositiveFloat | None = None
    teacher_top_k: PositiveInt | None = None
    chunk_size: PositiveInt = 128

    def spec(self) -> DivergenceSpec:
        return DivergenceSpec(
            kind=self.divergence,
            beta=self.beta,
            forward_weight=self.forward_weight,
            term_clip=self.term_clip,
            teacher_top_k=self.teacher_top_k,
        )


class SelfDistillConfig(RunConfig):
    method: Literal["selfdistill"] = "selfdistill"
    batch_size: PositiveInt = 32  # prompts per optimizer step
    micro_batch_size: PositiveInt = 32
    rollout: RolloutConfig = RolloutConfig()
    rollout_filter: Literal["all", "correct", "incorrect"] = "all"
    teacher: TeacherConfig = TeacherConfig()
    loss: LossConfig = LossConfig()

    @model_validator(mode="after")
    def _micro_divides(self) -> SelfDistillConfig:
        if (self.batch_size * self.rollout.n) % self.micro_batch_size:
            raise ValueError("micro_batch_size must divide batch_size * rollout.n")
        training_engine_lengths(self)
        return self


def keep_rollouts(correct: Sequence[bool], rule: str) -> list[int]:
    """Indices of the rollouts that train: all, correct-only, or incorrect-only."""
    if rule == "all":
        return list(range(len(correct)))
    wanted = rule == "correct"
    return [i for i, c in enumerate(correct) if c == wanted]


def distill_loss_sum(
    student, teacher: Teacher, student_prompts, teacher_prompts, responses, loss: LossConfig, pad_id: int
) -> torch.Tensor:
    """Sum over the response tokens of the per-token divergence (the caller divides by the count).

    The teacher runs under inference mode and only its hidden states at the response positions
    reach the loss; both LM heads run inside `divergence_sum`, chunk by chunk, so neither side's
    full-vocabulary logits are ever held.
    """
    teacher_hidden = teacher.hidden(teacher_prompts, responses, pad_id)  # (N, H), no grad
    student_hidden = response_hidden(student, student_prompts, responses, pad_id)  # (N, H)
    tokens = torch.tensor([t for r in responses for t in r], device=student_hidden.device)  # (N,)
    student_head, teacher_head = output_head(student), teacher.head
    total, _ = divergence_sum(
        student_hidden,
        student_head.weight,
        teacher_hidden,
        teacher_head.weight,
        loss.spec(),
        student_bias=student_head.bias,
        teacher_bias=teacher_head.bias,
        chunk_size=loss.chunk_size,
        tokens=tokens,
    )
    return total


@dataclass(frozen=True)
class DistillBatch:
    """The rollouts one step trains on (the whole batch: every rank holds it) and, for each, the
    teacher's prompt for the same problem."""

    rollouts: Sequence[Rollout]
    teacher_prompts: Sequence[Sequence[int]]


def distill_backward(
    model,
    teacher: Teacher,
    batch: DistillBatch,
    loss: LossConfig,
    *,
    pad_id: int,
    micro_batch_size: int,
    accelerator: Accelerator | None = None,
    precision=contextlib.nullcontext,
) -> float:
    """Loss and backward of one step: the mean divergence per response token (nan if there is none).

    This rank trains on its share of the batch (crisp.distributed.micro_batches; all of it without an
    accelerator) in micro-batches of `micro_batch_size`. Each micro-batch's summed divergence is
    divided by the batch's token count (times the number of ranks, which DDP averages over), so the
    accumulated gradient is that of one big batch. With more than one micro-batch the share is first
    ordered by length, so that each micro-batch pads to a length close to its own (the gradient is
    the same, only summed in another order). `model` is the (possibly wrapped) student every forward
    goes through; `precision` the autocast context of the forward passes.
    """
    rollouts = batch.rollouts
    num_tokens = sum(r.num_tokens for r in rollouts)  # over the whole batch, every rank
    if not num_tokens:
        return float("nan")
    world = accelerator.num_processes if accelerator is not None else 1
    micro = micro_batches(
        len(rollouts),
        micro_batch_size,
        accelerator,
        length=lambda i: len(rollouts[i].prompt_ids) + rollouts[i].num_tokens,
    )
    loss_total = 0.0
    for m, (indices, real) in enumerate(micro):
        chosen = [rollouts[i] for i in indices]
        with grad_sync(accelerator, model, last=m == len(micro) - 1):
            with precision():
                loss_sum = distill_loss_sum(
                    model,
                    teacher,
                    [r.prompt_ids for r in chosen],
                    [batch.teacher_prompts[i] for i in indices],
                    [r.token_ids for r in chosen],
                    loss,
                    pad_id,
                )
            # DDP averages gradients over ranks; a placeholder micro-batch weighs nothing
            (loss_sum * (world if real else 0) / num_tokens).backward()
        if real:
            loss_total += loss_sum.item()
    return reduce_sum({"loss": loss_total}, accelerator)["loss"] / num_tokens


class SelfDistill(RolloutMethod):
    def __init__(self, cfg: SelfDistillConfig, accelerator: Accelerator):
        super().__init__(cfg, accelerator)
        self.label = cfg.teacher.update + " selfdistill"
        self.teacher = Teacher(
            self.model,
            update=cfg.teacher.update,
            refresh_every=cfg.teacher.refresh_every,
            ema_decay=cfg.teacher.ema_decay,
        )
        self.teacher.model.to(accelerator.device)
        if self.teacher.owns_weights:  # not the student itself (live) nor an adapter on it: checkpoints hold it
            self.checkpointed["teacher"] = self.teacher.model
        self.instruction = resolve_instruction(
            cfg.teacher.instruction, percent=cfg.teacher.percent, words=cfg.teacher.words
        )

    def step(self, step: int, trainer: Trainer) -> StepResult:
        cfg, timer = self.cfg, trainer.timer
        batch: list[Problem] = self.stream.take(cfg.batch_size)
        # each rank samples and grades its slice of the prompts; then every rank holds the whole batch
        graded = gather(
            self.generate_and_grade(batch, self.builder, rollout_seed(cfg.seed, step), trainer), trainer.accelerator
        )
        kept = keep_rollouts([g.correct for g in graded], cfg.rollout_filter)
        with timer("prompts"):
            teacher_prompts = {}
            for i in kept:
                index = graded[i].rollout.prompt_index
                if index not in teacher_prompts:
                    teacher_prompts[index] = self.builder.teacher_ids(
                        batch[index], instruction=self.instruction, reference=cfg.teacher.reference_solution
                    )
        with timer("loss_backward"):
            rollouts = [graded[i].rollout for i in kept]
            loss = distill_backward(
                trainer.model,
                self.teacher,
                DistillBatch(rollouts, [teacher_prompts[r.prompt_index] for r in rollouts]),
                cfg.loss,
                pad_id=self.tokenizer.pad_token_id,
                micro_batch_size=cfg.micro_batch_size,
                accelerator=trainer.accelerator,
                precision=trainer.precision,
            )
        # the rollout filter kept nothing: no update, but not a failed step either
        grad_norm = trainer.update(loss if kept else None)
        with timer("teacher_update"):
            refreshed = self.teacher.after_step(step + 1, self.model)
        metrics = {
            "train/loss": loss,
            "train/grad_norm": grad_norm,
            **rollout_metrics(graded),
            "rollout/kept": len(kept),
            "teacher/refreshes": self.teacher.refreshes,
            "teacher/refreshed": refreshed,
        }
        progress = {
            "loss": f"{loss:.4f}",
            "len": f"{metrics['rollout/mean_tokens']:.0f}",
            "acc": f"{metrics['rollout/accuracy']:.2f}",
        }
        return StepResult(metrics, samples=[g.record() for g in graded[:2]], progress=progress)

    def state_dict(self) -> dict:
        return {"refreshes": self.teacher.refreshes}

    def load_state_dict(self, state: dict) -> None:
        self.teacher.refreshes = state["refreshes"]


CONFIG, METHOD = SelfDistillConfig, SelfDistill
