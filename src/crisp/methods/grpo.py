"""SIRI and TFPI: GRPO with DAPO's changes, a length-capped reward and a max-length schedule.

TFPI is this loop with thinking-free prompts (prompt.thinking_free) and a staged schedule of growing
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
            divided by a normaliser that does not depend on L (config.GRPOConfig explains the choice)

Run under `accelerate launch`, the ranks share each step as crisp.distributed describes: each
generates, grades and rewards a slice of the prompts, all hold every group (so dynamic sampling and
advantages agree), each updates on a slice of the rollouts with the normaliser of the whole batch.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from crisp.config import GRPOConfig
from crisp.data.problems import Problem
from crisp.distributed import (gather, grad_sync, micro_batches, prepare, reduce_sum, save_final,
                               shard)
from crisp.evaluate import score_rollouts
from crisp.grading import get_grader, grade
from crisp.loop import ProblemStream, TrainingRun, open_run, trainable_model, training_problems
from crisp.losses import clipped_surrogate_loss
from crisp.modeling import output_head, response_hidden
from crisp.optim import build_optimizer, step_if_finite
from crisp.prompts import PromptBuilder
from crisp.rewards import dynamic_sampling_mask, group_advantages, length_capped_reward
from crisp.rollout import Rollout
from crisp.rollout_vllm import build_generator, sync_weights
from crisp.schedules import max_length_at, stage_at, stage_starts
from crisp.teacher import Teacher
from crisp.tracking import finish_trackers


def _sampled_logprobs(head, hidden, tokens):
    logits = head(hidden).float()  # (n, V)
    return torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)  # (n,)


def token_logprobs(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
                   chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the response tokens, computed at the response positions only.

    The LM head and an fp32 log_softmax run `chunk_size` positions at a time (checkpointed when
    autograd is on), so the (N, V) logits never exist at once. Returns (B, T) log-probs, zero past
    each response's end, and the (B, T) bool mask of real response tokens.
    """
    hidden = response_hidden(model, prompts, responses, pad_id)  # (N, H)
    return logprobs_from_hidden(hidden, output_head(model), responses, chunk_size)


def logprobs_from_hidden(hidden: torch.Tensor, lm_head, responses: Sequence[Sequence[int]],
                         chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """token_logprobs from the (N, H) hidden states at the response positions."""
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


def micro_logprobs(model, rollouts: Sequence[Rollout], pad_id: int,
                   chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, T) log-probs of the rollouts' response tokens under `model` (zero past each response's end)
    and the (b, T) mask of the response tokens."""
    return token_logprobs(model, [r.prompt_ids for r in rollouts], [r.token_ids for r in rollouts], pad_id,
                          chunk_size)


def reference_logprobs(reference: Teacher, rollouts: Sequence[Rollout], pad_id: int, chunk_size: int) -> torch.Tensor:
    """micro_logprobs under the frozen reference (with LoRA, the policy with its adapters off)."""
    responses = [r.token_ids for r in rollouts]
    hidden = reference.hidden([r.prompt_ids for r in rollouts], responses, pad_id)  # (n, H)
    return logprobs_from_hidden(hidden, reference.head, responses, chunk_size)[0]  # (b, T)


def surrogate_backward(model, update: Sequence[Rollout], advantages: torch.Tensor, cfg: GRPOConfig, pad_id: int, *,
                       normaliser: float | None, num_train: int, micro: list | None = None, old: list | None = None,
                       ref: list | None = None, accelerator=None,
                       precision=contextlib.nullcontext) -> tuple[float, dict[str, float]]:
    """One pass of DAPO's clipped surrogate over this rank's share of `update`, with backward.

    `advantages` is (len(update),); `micro` is crisp.distributed.micro_batches of `update` (computed
    here when not given; without an accelerator, all of `update` in one process); `old`/`ref` hold
    per-micro-batch (b, T) log-probs on those micro-batches (old None: the pass's own detached
    log-probs are the old ones, exact when the weights that sampled are the current ones).
    `num_train` counts every rollout the step trains on, skipped ones included (the sequence mean
    divides by it). Each rank's loss is scaled by the number of ranks, which DDP averages over.
    Returns the loss and the token-weighted clip/ratio stats, summed over ranks.
    """
    if micro is None:
        micro = micro_batches(len(update), cfg.micro_batch_size, accelerator)
    world = accelerator.num_processes if accelerator is not None else 1
    loss, stats = 0.0, {}
    update_tokens = sum(r.num_tokens for r in update)
    for m, (indices, real) in enumerate(micro):
        with grad_sync(accelerator, model, last=m == len(micro) - 1):
            with precision():
                logprobs, mask = micro_logprobs(model, [update[i] for i in indices], pad_id, cfg.chunk_size)  # (b, T)
                micro_loss, micro_stats = clipped_surrogate_loss(
                    logprobs, old[m] if old else logprobs.detach(), advantages[indices], mask,
                    eps_low=cfg.eps_low, eps_high=cfg.eps_high, aggregation=cfg.aggregation,
                    normaliser=normaliser, kl_coef=cfg.kl_coef, ref_logprobs=ref[m] if ref else None,
                )
            if cfg.aggregation == "sequence":  # a mean over this micro-batch's sequences
                micro_loss = micro_loss * len(indices) / num_train
            # DDP averages gradients over ranks; a placeholder micro-batch weighs nothing
            (micro_loss * (world if real else 0.0)).backward()
        share = float(mask.sum()) / update_tokens if real else 0.0
        loss += micro_loss.item() if real else 0.0
        for key, value in micro_stats.items():  # token-weighted over the micro-batches
            stats[key] = stats.get(key, 0.0) + value * share
    totals = reduce_sum({"loss": loss, **stats}, accelerator)  # one collective for all of them
    return totals.pop("loss"), totals


def capped_rewards(batch: Sequence[Problem], rollouts: Sequence[Rollout], records: Sequence[dict], *, cap: int,
                   tokenizer, grader_name: str) -> list[float]:
    """length_capped_reward of every rollout; answers already graded in `records` are not graded again."""
    verdicts = {(r["response"], r["gold"]): r["correct"] for r in records}
    grader = get_grader(grader_name)

    def is_correct(text: str, gold: str) -> bool:
        verdict = verdicts.get((text, gold))
        return verdict if verdict is not None else grade(text, gold, grader=grader).correct

    return [
        length_capped_reward(r.token_ids, batch[r.prompt_index].answer, cap=cap, eos_id=tokenizer.eos_token_id,
                             decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True), grade=is_correct)
        for r in rollouts
    ]


def loss_normaliser(cfg: GRPOConfig, num_tokens: int) -> float | None:
    """Denominator of the token-level loss (None for sequence aggregation, which averages itself)."""
    if cfg.aggregation == "sequence":
        return None
    if cfg.loss_normaliser == "constant":
        return float(cfg.batch_size * cfg.group_size * cfg.schedule.l_max)
    return float(max(num_tokens, 1))


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
        cap = max_length_at(step, kind=schedule.kind, l_min=schedule.l_min, l_max=schedule.l_max,
                            period=schedule.period)
        return StepPlan(cap, cfg.prompt.thinking_free)
    index = stage_at(step, schedule.stage_steps)
    stage = schedule.stages[index]
    thinking_free = cfg.prompt.thinking_free if stage.thinking_free is None else stage.thinking_free
    return StepPlan(stage.max_length, thinking_free, stage=index + 1,
                    stage_start=step == stage_starts(schedule.stage_steps)[index])


def train_grpo(cfg: GRPOConfig) -> Path:
    accelerator, out = open_run(cfg)
    main = accelerator.is_main_process  # only rank 0 writes files
    task, problems, eval_problems = training_problems(cfg)  # bad data fails here, before any model is loaded
    policy, tokenizer = trainable_model(cfg)
    # The initial weights, frozen (taken before a resume loads later weights); with LoRA, the adapters off.
    reference = Teacher(policy, update="frozen") if cfg.kl_coef else None
    if reference:
        reference.model.to(accelerator.device)
    optimizer, scheduler = build_optimizer(policy, cfg.optim, cfg.max_steps * cfg.ppo_epochs)
    # model: the wrapped policy, which every forward pass of the policy goes through (DDP/FSDP)
    model, optimizer = prepare(accelerator, policy, optimizer, checkpoints=cfg.uses_checkpoints)
    builder = PromptBuilder.from_config(tokenizer, cfg.prompt)  # in-training evaluation uses the run's mode
    builders = {mode: PromptBuilder.from_config(tokenizer, cfg.prompt.model_copy(update={"thinking_free": mode}))
                for mode in (False, True)}  # the rollouts use the mode of their step's stage
    grader = task.grader
    generator = build_generator(cfg.rollout.backend, cfg.rollout.vllm, policy, tokenizer, batch_size=cfg.generation_batch_size,
                                trust_remote_code=cfg.model.trust_remote_code,
                                max_new_tokens=max(cfg.schedule.l_max,
                                                   cfg.eval.sampling.max_new_tokens if cfg.eval else 0))
    stream = ProblemStream(problems, cfg.seed)
    # the reference model is the initial weights, rebuilt from model.path: a checkpoint need not hold it
    run = TrainingRun(cfg, accelerator=accelerator, models={"model": policy}, tokenizer=tokenizer, optimizer=optimizer,
                      scheduler=scheduler, stream=stream, builder=builder, eval_problems=eval_problems,
                      eval_generator=generator if cfg.rollout.backend == "vllm" else None)
    timer, precision = run.timer, run.precision
    pad_id = tokenizer.pad_token_id
    G = cfg.group_size

    step, _ = run.resume()
    sync_weights(generator, policy)  # a vLLM engine gets the resumed weights
    bar = tqdm(total=cfg.max_steps, initial=step, desc="siri grpo", dynamic_ncols=True, disable=not main)
    while step < cfg.max_steps:
        plan = step_plan(cfg, step)
        cap, rollout_builder = plan.cap, builders[plan.thinking_free]
        if plan.stage_start and main:
            mode = "thinking-free" if plan.thinking_free else "thinking"
            bar.write(f"stage {plan.stage} of {len(cfg.schedule.stages)} starts at step {step + 1}: "
                      f"max length {cap}, {mode} prompts")

        # Sample, grade, reward. Groups of G rollouts stay contiguous (the generator keeps prompt order).
        sampled: list[Rollout] = []  # every rollout of this step (for the rollout/ metrics)
        sampled_rewards: list[float] = []
        sampled_correct: list[bool] = []  # graded without the cap
        train: list[Rollout] = []  # the groups that train
        train_rewards: list[float] = []
        rounds = 0
        while rounds < (cfg.max_sampling_rounds if cfg.dynamic_sampling else 1) and len(train) < cfg.batch_size * G:
            batch: list[Problem] = stream.take(cfg.batch_size)
            mine = shard(len(batch), accelerator)  # this rank's prompts; every rank then gathers all groups
            with timer("generate"), precision():
                rollouts = generator.generate([rollout_builder.student_ids(batch[i]) for i in mine], cfg.rollout,
                                              seed=cfg.seed * 1_000_003 + step * 1_000 + rounds, max_new_tokens=cap,
                                              first_index=mine.start)
            with timer("grade"):
                records = score_rollouts(batch, rollouts, grader)
                rewards = capped_rewards(batch, rollouts, records, cap=cap, tokenizer=tokenizer, grader_name=grader)
            rollouts, records, rewards = map(list, zip(*gather(list(zip(rollouts, records, rewards)), accelerator)))
            if rounds == 0:
                samples = [{"cap": cap, "reward": w, **r} for r, w in zip(records[:2], rewards)]
            keep = torch.ones(len(batch), dtype=torch.bool)  # (B,)
            if cfg.dynamic_sampling:
                keep = dynamic_sampling_mask(torch.tensor(rewards).view(-1, G))  # (B,)
            for g in keep.nonzero().flatten().tolist()[: cfg.batch_size - len(train) // G]:
                train += rollouts[g * G : (g + 1) * G]
                train_rewards += rewards[g * G : (g + 1) * G]
            sampled += rollouts
            sampled_rewards += rewards
            sampled_correct += [r["correct"] for r in records]
            rounds += 1
        advantages = group_advantages(torch.tensor(train_rewards), G, scale_by_std=cfg.scale_by_std) if train else None
        num_tokens = sum(r.num_tokens for r in train)
        normaliser = loss_normaliser(cfg, num_tokens)  # over every training rollout, whatever is skipped below

        # A rollout with a zero advantage (its group's rewards all agree) adds nothing to the surrogate:
        # without a KL term it is left out of the forward and backward passes.
        active = [i for i in range(len(train)) if cfg.kl_coef or advantages[i] != 0]
        update = [train[i] for i in active]
        update_advantages = advantages[active].to(accelerator.device) if active else None  # (u,)
        # This rank's share of the update, in micro-batches (the same number on every rank).
        micro = micro_batches(len(update), cfg.micro_batch_size, accelerator) if update else []

        # Old (and reference) log-probs once, on the same micro-batches the update will use.
        with timer("old_logprobs"), torch.no_grad(), precision():
            old = [micro_logprobs(model, [update[i] for i in indices], pad_id, cfg.chunk_size)[0]
                   for indices, _ in micro] if cfg.ppo_epochs > 1 else None
            ref = [reference_logprobs(reference, [update[i] for i in indices], pad_id, cfg.chunk_size)
                   for indices, _ in micro] if reference else None

        loss, grad_norm, pass_stats = float("nan"), float("nan"), {}
        for _ in range(cfg.ppo_epochs):
            if update:  # empty when no group had mixed rewards: nothing to learn from, no step
                with timer("loss_backward"):
                    loss, pass_stats = surrogate_backward(
                        model, update, update_advantages, cfg, pad_id, normaliser=normaliser, num_train=len(train),
                        micro=micro, old=old, ref=ref, accelerator=accelerator, precision=precision)
                with timer("step"):
                    grad_norm, stepped = step_if_finite(policy, optimizer, loss, cfg.optim.grad_clip)
                    run.count_step(stepped)
                    if stepped:
                        sync_weights(generator, policy)
            scheduler.step()
        step += 1

        lengths = [r.num_tokens for r in sampled]
        mixed = dynamic_sampling_mask(torch.tensor(sampled_rewards).view(-1, G))  # (groups,)
        metrics = {
            "train/loss": loss,
            "train/grad_norm": grad_norm,
            "train/lr": scheduler.get_last_lr()[0],
            "train/skipped_steps": run.skipped,
            "train/loss_normaliser": normaliser,
            "train/updated_rollouts": len(update),
            **{f"train/{key}": value for key, value in pass_stats.items()},  # last pass: clip fractions, ratio, kl
            "rollout/max_len": cap,
            "rollout/thinking_free": plan.thinking_free,
            **({"rollout/stage": plan.stage} if plan.stage else {}),
            **({"train/stage_start": plan.stage} if plan.stage_start else {}),
            "rollout/reward_mean": sum(sampled_rewards) / len(sampled_rewards),
            "rollout/accuracy": sum(sampled_correct) / len(sampled_correct),
            "rollout/mean_tokens": sum(lengths) / len(lengths),
            "rollout/truncation_rate": sum(r.finish_reason == "length" for r in sampled) / len(sampled),
            "rollout/mixed_group_fraction": float(mixed.float().mean()),
            "rollout/train_groups": len(train) // G,
            "rollout/sampling_rounds": rounds,
        }
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4g}", reward=f"{metrics['rollout/reward_mean']:.2f}",
                        len=f"{metrics['rollout/mean_tokens']:.0f}", L=cap)
        run.end_step(step, metrics, samples, loop_state={}, always_log=plan.stage_start)
    bar.close()
    final = out / "model"
    save_final(accelerator, model, tokenizer, final)
    finish_trackers(accelerator)
    return final
