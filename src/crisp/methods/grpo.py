"""SIRI and TFPI (method: grpo): GRPO with DAPO's changes, a length-capped reward and a
max-length schedule.

TFPI is this method with thinking-free prompts (prompt.thinking_free) and a staged schedule of growing
maximum lengths (schedule.kind: stages); a stage may switch back to thinking mode ("TFPI + RL").

One step, top to bottom:
  cap       L = the schedule's length at this step (step_plan): the generation limit and the
            reward's length cap; with stages, the stage also says which prompt mode this step uses
  generate  G rollouts per prompt, at most L new tokens each
  reward    1 if the response ends (EOS) within L tokens and its answer is correct, else 0
  advantage (R - group mean) / group std over the G rollouts of one prompt; with dynamic sampling,
            groups whose rewards all agree (no signal) are dropped and more prompts are drawn,
            up to max_sampling_rounds generation rounds
  old       log-probs of the sampled tokens under the weights that sampled them (and under the
            initial model when kl_coef > 0), no grad, recorded once; with ppo_epochs = 1 the first
            (only) pass runs on those same weights, so its own detached log-probs are the old ones
            and the extra forward is skipped
  update    ppo_epochs passes; each pass is one optimizer step over all rollouts in micro-batches:
            DAPO's clipped surrogate (eps_low, eps_high), summed over the response tokens and
            divided by a normaliser that does not depend on L (GRPOConfig explains the choice)

Run under `accelerate launch`, the ranks share each step as crisp.distributed describes: each
generates, grades and rewards a slice of the prompts, all hold every group (so dynamic sampling and
advantages agree), each updates on a slice of the rollouts with the normaliser of the whole batch.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal, Protocol

import torch
from accelerate import Accelerator
from pydantic import Field, ValidationInfo, field_serializer, field_validator, model_serializer, model_validator
from torch.nn.utils.rnn import pad_sequence
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from crisp.config import PositiveInt, RolloutConfig, RunConfig, Strict, training_engine_lengths
from crisp.data.problems import Problem
from crisp.distributed import gather, grad_sync, micro_batches, reduce_sum
from crisp.driver import RolloutMethod, StepResult, Trainer
from crisp.evaluate import GradedRollout, rollout_metrics
from crisp.grading import get_grader, grade
from crisp.losses import SurrogateSpec, clipped_surrogate_loss
from crisp.modeling import output_head, response_hidden
from crisp.prompts import PromptBuilder
from crisp.rewards import dynamic_sampling_mask, group_advantages, length_capped_reward
from crisp.rollout import Rollout, rollout_seed
from crisp.schedules import max_length_at, stage_at, stage_starts
from crisp.teacher import Teacher


class Stage(Strict):
    """One stage of a staged schedule: its maximum response length, for `steps` training steps."""

    max_length: PositiveInt
    steps: PositiveInt
    # None: the run's prompt.thinking_free; false for a last stage in thinking mode ("TFPI + RL")
    thinking_free: bool | None = None


class LengthSchedule(Strict):
    """The maximum rollout length L over training steps: SIRI's periodic kinds (see
    crisp.schedules.max_length_at) or `kind: stages`, TFPI's stages of growing length (`stages`: a
    list of {max_length, steps}, run in order). For stages, l_min and l_max are the smallest and the
    largest stage length, filled in here; the run's max_steps may stop inside the stages but not
    run past them."""

    kind: Literal["constant", "stair", "cosine", "stair_cosine", "stages"] = "constant"
    l_min: PositiveInt = 8192
    l_max: PositiveInt = 16384
    period: PositiveInt = 640  # T, in training steps
    stages: list[Stage] | None = None

    @field_validator("l_max")
    @classmethod
    def _ordered(cls, l_max: int, info: ValidationInfo) -> int:
        l_min = info.data.get("l_min")
        if info.data.get("kind") != "stages" and l_min is not None and l_min > l_max:  # stages: checked below
            raise ValueError(f"schedule.l_max ({l_max}) must be >= schedule.l_min ({l_min})")
        return l_max

    @model_validator(mode="after")
    def _stages_fill_the_bounds(self) -> LengthSchedule:
        if self.kind != "stages":
            if self.stages is not None:
                raise ValueError("schedule.stages: only with schedule.kind: stages")
            return self
        if not self.stages:
            raise ValueError("schedule.stages: kind stages needs a list of {max_length, steps}")
        lengths = [stage.max_length for stage in self.stages]
        derived = {"l_min": min(lengths), "l_max": max(lengths)}
        for key, value in derived.items():
            if key in self.model_fields_set and getattr(self, key) != value:
                raise ValueError(
                    f"schedule.{key} ({getattr(self, key)}) must equal the stages' "
                    f"{'smallest' if key == 'l_min' else 'largest'} max_length ({value}) or be left out"
                )
        if "period" in self.model_fields_set:
            raise ValueError("schedule.period: not used by kind stages")
        for key, value in derived.items():
            object.__setattr__(self, key, value)  # plain assignment would re-run this validator
        return self

    @model_serializer(mode="wrap")
    def _without_derived(self, handler) -> dict:
        """A dumped staged schedule leaves out the derived bounds (so that it reloads with other
        stages); a periodic one leaves out the unused stages."""
        data = handler(self)
        for key in ("l_min", "l_max", "period") if self.kind == "stages" else ("stages",):
            data.pop(key, None)
        return data

    @property
    def stage_steps(self) -> list[int]:
        return [stage.steps for stage in self.stages or []]


class GRPOConfig(RunConfig):
    """SIRI: GRPO with DAPO's changes, a length-capped reward and a max-length schedule.

    `rollout` sets the sampler; its `max_new_tokens` and `n` come from `schedule` and `group_size`.
    `loss_normaliser` is the denominator of the token-level loss:
      - "constant" (default): batch_size * group_size * schedule.l_max (with stages: the largest
        stage length), the same number every step,
        so neither the scheduled cap nor how long this batch's responses are changes the weight of
        a token (a shorter cap does not inflate the per-token gradient);
      - "batch_tokens": the response tokens of the step's batch (DAPO's token mean); it shrinks
        when the cap shrinks, so every token weighs more in the compression phase.
    """

    method: Literal["grpo"] = "grpo"
    batch_size: PositiveInt = 128  # prompts per step
    group_size: Annotated[int, Field(ge=2)] = 16  # G samples per prompt
    micro_batch_size: PositiveInt = 16  # rollouts per forward/backward
    generation_batch_size: PositiveInt = 256  # sequences per generate call (bounds the KV cache)
    rollout: RolloutConfig = RolloutConfig()
    schedule: LengthSchedule = LengthSchedule()
    eps_low: Annotated[float, Field(ge=0)] = 0.2
    eps_high: Annotated[float, Field(ge=0)] = 0.28
    scale_by_std: bool = True
    aggregation: Literal["token", "sequence"] = "token"
    loss_normaliser: Literal["constant", "batch_tokens"] = "constant"
    kl_coef: Annotated[float, Field(ge=0)] = 0.0  # k3 KL to the initial model; 0 = no reference model
    ppo_epochs: PositiveInt = 1  # optimizer steps per rollout batch (old log-probs from sampling time)
    dynamic_sampling: bool = False  # DAPO: resample until batch_size groups have mixed rewards
    max_sampling_rounds: PositiveInt = 3  # generation rounds per step when dynamic_sampling is on
    chunk_size: PositiveInt = 1024  # response tokens per LM-head chunk when computing log-probs

    @field_validator("eps_high")
    @classmethod
    def _clip_range(cls, eps_high: float, info: ValidationInfo) -> float:
        eps_low = info.data.get("eps_low")
        if eps_low is not None and eps_high < eps_low:
            raise ValueError(f"eps_high ({eps_high}) must be >= eps_low ({eps_low})")
        return eps_high

    @model_validator(mode="after")
    def _max_steps_within_the_stages(self) -> GRPOConfig:
        if self.schedule.kind == "stages" and self.max_steps > sum(self.schedule.stage_steps):
            raise ValueError(
                f"max_steps ({self.max_steps}) runs past the schedule's stages "
                f"({sum(self.schedule.stage_steps)} steps in all): lengthen a stage or lower max_steps"
            )
        return self

    @model_validator(mode="after")
    def _rollout_follows_group_and_schedule(self) -> GRPOConfig:
        """rollout.n is group_size and rollout.max_new_tokens is schedule.l_max: filled in here so
        that the dumped config shows them; an explicit different value is an error, not ignored."""
        wanted = {"n": ("group_size", self.group_size), "max_new_tokens": ("schedule.l_max", self.schedule.l_max)}
        for key, (owner, value) in wanted.items():
            if key in self.rollout.model_fields_set and getattr(self.rollout, key) != value:
                raise ValueError(
                    f"rollout.{key} ({getattr(self.rollout, key)}) must equal {owner} ({value}) "
                    f"or be left out: grpo takes it from {owner}"
                )
        filled = self.rollout.model_copy(update={key: value for key, (_, value) in wanted.items()})
        object.__setattr__(self, "rollout", filled)  # plain assignment would re-run this validator
        training_engine_lengths(self)
        return self

    @property
    def optimizer_steps(self) -> int:
        return self.max_steps * self.ppo_epochs  # ppo_epochs optimizer steps per training step

    def surrogate(self) -> SurrogateSpec:
        return SurrogateSpec(
            eps_low=self.eps_low, eps_high=self.eps_high, aggregation=self.aggregation, kl_coef=self.kl_coef
        )

    @field_serializer("rollout")
    def _rollout_without_derived(self, rollout: RolloutConfig) -> dict:
        """The dumped config leaves out the derived n and max_new_tokens, so it reloads with overrides."""
        return rollout.model_dump(exclude={"n", "max_new_tokens"})


def _sampled_logprobs(head, hidden, tokens):
    logits = head(hidden).float()  # (n, V)
    return torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)  # (n,)


def token_logprobs(
    model: torch.nn.Module | Teacher,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the response tokens under `model` (or a frozen reference: with LoRA, the
    policy with its adapters off), computed at the response positions only.

    The LM head and an fp32 log_softmax run `chunk_size` positions at a time (checkpointed when
    autograd is on), so the (N, V) logits never exist at once. Returns (B, T) log-probs, zero past
    each response's end, and the (B, T) bool mask of real response tokens.
    """
    if isinstance(model, Teacher):
        hidden, lm_head = model.hidden(prompts, responses, pad_id), model.head  # (N, H), no grad
    else:
        hidden, lm_head = response_hidden(model, prompts, responses, pad_id), output_head(model)  # (N, H)
    tokens = torch.tensor([t for r in responses for t in r], device=hidden.device)  # (N,)
    head = functools.partial(_sampled_logprobs, lm_head)
    pieces = []
    for start in range(0, len(tokens), chunk_size):
        chunk = (hidden[start : start + chunk_size], tokens[start : start + chunk_size])  # (n, H), (n,)
        pieces.append(checkpoint(head, *chunk, use_reentrant=False) if torch.is_grad_enabled() else head(*chunk))
    lengths = [len(r) for r in responses]
    logprobs = pad_sequence(torch.cat(pieces).split(lengths), batch_first=True)  # (B, T)
    positions = torch.arange(logprobs.shape[1], device=hidden.device)  # (T,)
    mask = positions[None] < torch.tensor(lengths, device=hidden.device)[:, None]  # (B, T)
    return logprobs, mask


def rollout_logprobs(
    model: torch.nn.Module | Teacher, rollouts: Sequence[Rollout], pad_id: int, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """token_logprobs of the rollouts' responses after their prompts: (b, T) log-probs and mask."""
    return token_logprobs(model, [r.prompt_ids for r in rollouts], [r.token_ids for r in rollouts], pad_id, chunk_size)


class Reward(Protocol):
    """The rewards of a rank's graded rollouts (groups of G contiguous) under the step's length cap."""

    def __call__(self, graded: Sequence[GradedRollout], cap: int) -> list[float]: ...


class LengthCappedReward:
    """SIRI's reward (crisp.rewards.length_capped_reward): 1 for a correct answer that ends within the
    cap. An answer the rollout's grade already judged is not graded again."""

    def __init__(self, tokenizer, grader_name: str):
        self.tokenizer, self.grader = tokenizer, get_grader(grader_name)

    def __call__(self, graded: Sequence[GradedRollout], cap: int) -> list[float]:
        verdicts = {(g.rollout.text, g.problem.answer): g.correct for g in graded}

        def is_correct(text: str, gold: str) -> bool:
            verdict = verdicts.get((text, gold))
            return verdict if verdict is not None else grade(text, gold, grader=self.grader).correct

        return [
            length_capped_reward(
                g.rollout.token_ids,
                g.problem.answer,
                cap=cap,
                eos_id=self.tokenizer.eos_token_id,
                decode=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
                grade=is_correct,
            )
            for g in graded
        ]


@dataclass(frozen=True)
class StepPlan:
    """What the schedule says about one training step."""

    cap: int  # the maximum response length
    thinking_free: bool  # the prompt mode
    stage: int | None = None  # the 1-based stage of a staged schedule
    stage_start: bool = False  # the first step of that stage


def step_plan(cfg: GRPOConfig, step: int) -> StepPlan:
    """The cap, prompt mode and stage of 0-based training step `step`; it depends on the step alone,
    so a resumed run follows the same plan."""
    schedule = cfg.schedule
    if schedule.kind != "stages":
        cap = max_length_at(
            step, kind=schedule.kind, l_min=schedule.l_min, l_max=schedule.l_max, period=schedule.period
        )
        return StepPlan(cap, cfg.prompt.thinking_free)
    index = stage_at(step, schedule.stage_steps)
    stage = schedule.stages[index]
    thinking_free = cfg.prompt.thinking_free if stage.thinking_free is None else stage.thinking_free
    return StepPlan(
        stage.max_length, thinking_free, stage=index + 1, stage_start=step == stage_starts(schedule.stage_steps)[index]
    )


@dataclass
class Groups:
    """Rollouts in groups of G (the samples of one prompt contiguous) and their rewards."""

    graded: list[GradedRollout] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)

    def extend(self, graded: Sequence[GradedRollout], rewards: Sequence[float]) -> None:
        self.graded += graded
        self.rewards += rewards

    @property
    def rollouts(self) -> list[Rollout]:
        return [g.rollout for g in self.graded]


def select_groups(rewards: Sequence[float], group_size: int, *, dynamic_sampling: bool, wanted: int) -> list[int]:
    """The groups (indices) of one sampling round that train: the first `wanted`, or with dynamic
    sampling the first `wanted` whose rewards do not all agree."""
    if not dynamic_sampling:
        return list(range(len(rewards) // group_size))[:wanted]
    keep = dynamic_sampling_mask(torch.tensor(rewards).view(-1, group_size))  # (groups,)
    return keep.nonzero().flatten().tolist()[:wanted]


def loss_normaliser(cfg: GRPOConfig, num_tokens: int) -> float | None:
    """Denominator of the token-level loss (None for sequence aggregation, which averages itself)."""
    if cfg.aggregation == "sequence":
        return None
    if cfg.loss_normaliser == "constant":
        return float(cfg.batch_size * cfg.group_size * cfg.schedule.l_max)
    return float(max(num_tokens, 1))


def surrogate_backward(
    model,
    update: Sequence[Rollout],
    advantages: torch.Tensor,
    spec: SurrogateSpec,
    *,
    pad_id: int,
    chunk_size: int,
    normaliser: float | None,
    num_train: int,
    micro: list,
    old: list | None = None,
    ref: list | None = None,
    accelerator: Accelerator | None = None,
    precision=contextlib.nullcontext,
) -> tuple[float, dict[str, float]]:
    """One pass of DAPO's clipped surrogate over this rank's share of `update`, with backward.

    `advantages` is (len(update),); `micro` is crisp.distributed.micro_batches of `update`; `old`/`ref`
    hold per-micro-batch (b, T) log-probs on those micro-batches (old None: the pass's own detached
    log-probs are the old ones, exact when the weights that sampled are the current ones).
    `num_train` counts every rollout the step trains on, skipped ones included (the sequence mean
    divides by it). Each rank's loss is scaled by the number of ranks, which DDP averages over.
    Returns the loss and the token-weighted clip/ratio stats, summed over ranks.
    """
    world = accelerator.num_processes if accelerator is not None else 1
    loss, stats = 0.0, {}
    update_tokens = sum(r.num_tokens for r in update)
    for m, (indices, real) in enumerate(micro):
        with grad_sync(accelerator, model, last=m == len(micro) - 1):
            with precision():
                logprobs, mask = rollout_logprobs(model, [update[i] for i in indices], pad_id, chunk_size)  # (b, T)
                micro_loss, micro_stats = clipped_surrogate_loss(
                    logprobs,
                    old[m] if old else logprobs.detach(),
                    advantages[indices],
                    mask,
                    eps_low=spec.eps_low,
                    eps_high=spec.eps_high,
                    aggregation=spec.aggregation,
                    normaliser=normaliser,
                    kl_coef=spec.kl_coef,
                    ref_logprobs=ref[m] if ref else None,
                )
            if spec.aggregation == "sequence":  # a mean over this micro-batch's sequences
                micro_loss = micro_loss * len(indices) / num_train
            # DDP averages gradients over ranks; a placeholder micro-batch weighs nothing
            (micro_loss * (world if real else 0.0)).backward()
        share = sum(update[i].num_tokens for i in indices) / update_tokens if real else 0.0  # its tokens' share
        loss += micro_loss.item() if real else 0.0
        for key, value in micro_stats.items():  # token-weighted over the micro-batches
            stats[key] = stats.get(key, 0.0) + value * share
    totals = reduce_sum({"loss": loss, **stats}, accelerator)  # one collective for all of them
    return totals.pop("loss"), totals


@dataclass
class PolicyUpdate:
    """What the update of one step did."""

    loss: float  # of the last pass (nan without an update)
    grad_norm: float  # of the last pass
    updated_rollouts: int  # rollouts that went through the forward and backward passes
    passes: list[dict[str, float]]  # each pass's clip fractions, ratio mean (and kl)


def policy_update(
    model,
    train: Groups,
    spec: SurrogateSpec,
    update: Callable[[float | None], float],
    *,
    reference: Teacher | None,
    normaliser: float | None,
    group_size: int,
    scale_by_std: bool,
    ppo_epochs: int,
    micro_batch_size: int,
    chunk_size: int,
    pad_id: int,
    accelerator: Accelerator | None = None,
    precision=contextlib.nullcontext,
    timer=None,
) -> PolicyUpdate:
    """The update of one step on the groups that train: advantages, old (and reference) log-probs
    once, then `ppo_epochs` passes, each a backward over this rank's micro-batches followed by
    `update(loss)` (the optimizer step; `update(None)` when there is nothing to learn from)."""
    timer = timer or (lambda name: contextlib.nullcontext())
    advantages = (
        group_advantages(torch.tensor(train.rewards), group_size, scale_by_std=scale_by_std) if train.graded else None
    )
    rollouts = train.rollouts
    # A rollout with a zero advantage (its group's rewards all agree) adds nothing to the surrogate:
    # without a KL term it is left out of the forward and backward passes.
    active = [i for i, a in enumerate(advantages.tolist() if train.graded else []) if spec.kl_coef or a != 0]
    chosen = [rollouts[i] for i in active]
    chosen_advantages = advantages[active] if active else None  # (u,)
    if chosen_advantages is not None and accelerator is not None:
        chosen_advantages = chosen_advantages.to(accelerator.device)
    # This rank's share of the update, in micro-batches (the same number on every rank).
    micro = micro_batches(len(chosen), micro_batch_size, accelerator) if chosen else []

    # Old (and reference) log-probs once, on the same micro-batches the update will use.
    with timer("old_logprobs"), torch.no_grad(), precision():
        old = (
            [rollout_logprobs(model, [chosen[i] for i in indices], pad_id, chunk_size)[0] for indices, _ in micro]
            if ppo_epochs > 1
            else None
        )
        ref = (
            [rollout_logprobs(reference, [chosen[i] for i in indices], pad_id, chunk_size)[0] for indices, _ in micro]
            if reference
            else None
        )

    loss, grad_norm, passes = float("nan"), float("nan"), []
    for _ in range(ppo_epochs):
        if not chosen:  # no group had mixed rewards: nothing to learn from, no step
            update(None)
            continue
        with timer("loss_backward"):
            loss, stats = surrogate_backward(
                model,
                chosen,
                chosen_advantages,
                spec,
                pad_id=pad_id,
                chunk_size=chunk_size,
                normaliser=normaliser,
                num_train=len(rollouts),
                micro=micro,
                old=old,
                ref=ref,
                accelerator=accelerator,
                precision=precision,
            )
        grad_norm = update(loss)
        passes.append(stats)
    return PolicyUpdate(loss, grad_norm, len(chosen), passes)


class GRPO(RolloutMethod):
    label = "siri grpo"

    def __init__(self, cfg: GRPOConfig, accelerator: Accelerator, *, reward: Reward | None = None):
        super().__init__(cfg, accelerator, generation_batch_size=cfg.generation_batch_size)
        # The initial weights, frozen (taken before a resume loads later weights); with LoRA, the adapters
        # off. Rebuilt from model.path, so a checkpoint need not hold them.
        self.reference = Teacher(self.model, update="frozen") if cfg.kl_coef else None
        if self.reference:
            self.reference.model.to(accelerator.device)
        self.reward = reward or LengthCappedReward(self.tokenizer, self.task.grader)
        # the rollouts use the prompt mode of their step's stage (the evaluation, the run's: self.builder)
        self.builders = {
            mode: PromptBuilder.from_config(self.tokenizer, cfg.prompt.model_copy(update={"thinking_free": mode}))
            for mode in (False, True)
        }

    def step(self, step: int, trainer: Trainer) -> StepResult:
        cfg, G = self.cfg, self.cfg.group_size
        plan = step_plan(cfg, step)
        if plan.stage_start and trainer.main:
            mode = "thinking-free" if plan.thinking_free else "thinking"
            tqdm.write(
                f"stage {plan.stage} of {len(cfg.schedule.stages)} starts at step {step + 1}: "
                f"max length {plan.cap}, {mode} prompts"
            )
        sampled, train, rounds = self.sample(plan, step, trainer)
        normaliser = loss_normaliser(cfg, sum(r.num_tokens for r in train.rollouts))  # whatever is skipped below
        update = policy_update(
            trainer.model,
            train,
            cfg.surrogate(),
            trainer.update,
            reference=self.reference,
            normaliser=normaliser,
            group_size=G,
            scale_by_std=cfg.scale_by_std,
            ppo_epochs=cfg.ppo_epochs,
            micro_batch_size=cfg.micro_batch_size,
            chunk_size=cfg.chunk_size,
            pad_id=self.tokenizer.pad_token_id,
            accelerator=trainer.accelerator,
            precision=trainer.precision,
            timer=trainer.timer,
        )

        mixed = dynamic_sampling_mask(torch.tensor(sampled.rewards).view(-1, G))  # (groups,)
        metrics = {
            "train/loss": update.loss,
            "train/grad_norm": update.grad_norm,
            "train/loss_normaliser": normaliser,
            "train/updated_rollouts": update.updated_rollouts,
            **{f"train/{key}": value for key, value in (update.passes[-1] if update.passes else {}).items()},
            "rollout/max_len": plan.cap,
            "rollout/thinking_free": plan.thinking_free,
            **({"rollout/stage": plan.stage} if plan.stage else {}),
            **({"train/stage_start": plan.stage} if plan.stage_start else {}),
            "rollout/reward_mean": sum(sampled.rewards) / len(sampled.rewards),
            **rollout_metrics(sampled.graded),
            "rollout/mixed_group_fraction": float(mixed.float().mean()),
            "rollout/train_groups": len(train.graded) // G,
            "rollout/sampling_rounds": rounds,
        }
        samples = [{"cap": plan.cap, "reward": w, **g.record()} for g, w in zip(sampled.graded[:2], sampled.rewards)]
        progress = {
            "loss": f"{update.loss:.4g}",
            "reward": f"{metrics['rollout/reward_mean']:.2f}",
            "len": f"{metrics['rollout/mean_tokens']:.0f}",
            "L": str(plan.cap),
        }
        return StepResult(metrics, samples=samples, progress=progress, always_log=plan.stage_start)

    def sample(self, plan: StepPlan, step: int, trainer: Trainer) -> tuple[Groups, Groups, int]:
        """Sample, grade and reward groups of G rollouts: (every group sampled, the groups that train,
        the sampling rounds). With dynamic sampling, groups whose rewards all agree (no signal) are
        dropped and more prompts drawn, up to max_sampling_rounds rounds. Each rank samples its slice
        of the prompts; every rank then holds every group (so dynamic sampling and advantages agree)."""
        cfg, G = self.cfg, self.cfg.group_size
        builder = self.builders[plan.thinking_free]
        sampled, train, rounds = Groups(), Groups(), 0
        while (
            rounds < (cfg.max_sampling_rounds if cfg.dynamic_sampling else 1) and len(train.graded) < cfg.batch_size * G
        ):
            batch: list[Problem] = self.stream.take(cfg.batch_size)
            graded = self.generate_and_grade(
                batch, builder, rollout_seed(cfg.seed, step, rounds), trainer, max_new_tokens=plan.cap
            )
            with trainer.timer("grade"):
                rewards = self.reward(graded, plan.cap)
            graded, rewards = map(list, zip(*gather(list(zip(graded, rewards)), trainer.accelerator)))
            for g in select_groups(
                rewards, G, dynamic_sampling=cfg.dynamic_sampling, wanted=cfg.batch_size - len(train.graded) // G
            ):
                train.extend(graded[g * G : (g + 1) * G], rewards[g * G : (g + 1) * G])
            sampled.extend(graded, rewards)
            rounds += 1
        return sampled, train, rounds


CONFIG, METHOD = GRPOConfig, GRPO
