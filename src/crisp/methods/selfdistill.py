"""Self-distillation: CRISP (a "be concise" teacher) and OPSD (a reference-solution teacher).

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
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from crisp.config import SelfDistillConfig
from crisp.data.problems import Problem
from crisp.distributed import (gather, grad_sync, micro_batches, prepare, reduce_sum, save_final,
                               shard)
from crisp.evaluate import score_rollouts
from crisp.losses import divergence_sum
from crisp.loop import ProblemStream, TrainingRun, open_run, trainable_model, training_problems
from crisp.modeling import output_head, response_hidden
from crisp.optim import build_optimizer, step_if_finite
from crisp.prompts import PromptBuilder, resolve_instruction
from crisp.rollout import Rollout
from crisp.rollout_vllm import build_generator, sync_weights
from crisp.teacher import Teacher
from crisp.tracking import finish_trackers


def keep_rollouts(correct: Sequence[bool], rule: str) -> list[int]:
    """Indices of the rollouts that train: all, correct-only, or incorrect-only."""
    if rule == "all":
        return list(range(len(correct)))
    wanted = rule == "correct"
    return [i for i, c in enumerate(correct) if c == wanted]


def distill_loss_sum(student, teacher: Teacher, student_prompts, teacher_prompts, responses, cfg, pad_id):
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
        student_bias=student_head.bias,
        teacher_bias=teacher_head.bias,
        chunk_size=cfg.loss.chunk_size,
        tokens=tokens,
        kind=cfg.loss.divergence,
        beta=cfg.loss.beta,
        forward_weight=cfg.loss.forward_weight,
        term_clip=cfg.loss.term_clip,
        teacher_top_k=cfg.loss.teacher_top_k,
    )
    return total


def distill_backward(model, teacher: Teacher, rollouts: Sequence[Rollout], teacher_prompts: Sequence[Sequence[int]],
                     cfg, pad_id: int, *, accelerator=None, precision=contextlib.nullcontext) -> float:
    """Loss and backward of one step: the mean divergence per response token (nan if there is none).

    `rollouts` are the step's whole batch (every rank holds it); this rank trains on its share of
    them (crisp.distributed.micro_batches; all of them without an accelerator) in micro-batches of
    `cfg.micro_batch_size`. Each micro-batch's summed divergence is divided by the batch's token
    count (times the number of ranks, which DDP averages over), so the accumulated gradient is that
    of one big batch. With more than one micro-batch the share is first ordered by length, so that
    each micro-batch pads to a length close to its own (the gradient is the same, only summed in
    another order). `model` is the (possibly wrapped) student every forward goes through;
    `precision` the autocast context of the forward passes.
    """
    num_tokens = sum(r.num_tokens for r in rollouts)  # over the whole batch, every rank
    if not num_tokens:
        return float("nan")
    world = accelerator.num_processes if accelerator is not None else 1
    micro = micro_batches(len(rollouts), cfg.micro_batch_size, accelerator,
                          length=lambda i: len(rollouts[i].prompt_ids) + rollouts[i].num_tokens)
    loss_total = 0.0
    for m, (indices, real) in enumerate(micro):
        chosen = [rollouts[i] for i in indices]
        with grad_sync(accelerator, model, last=m == len(micro) - 1):
            with precision():
                loss_sum = distill_loss_sum(
                    model,
                    teacher,
                    [r.prompt_ids for r in chosen],
                    [teacher_prompts[i] for i in indices],
                    [r.token_ids for r in chosen],
                    cfg,
                    pad_id,
                )
            # DDP averages gradients over ranks; a placeholder micro-batch weighs nothing
            (loss_sum * (world if real else 0) / num_tokens).backward()
        if real:
            loss_total += loss_sum.item()
    return reduce_sum({"loss": loss_total}, accelerator)["loss"] / num_tokens


def train_selfdistill(cfg: SelfDistillConfig) -> Path:
    accelerator, out = open_run(cfg)
    main = accelerator.is_main_process  # only rank 0 writes files
    task, problems, eval_problems = training_problems(cfg)  # bad data fails here, before any model is loaded
    student, tokenizer = trainable_model(cfg)
    teacher = Teacher(student, update=cfg.teacher.update, refresh_every=cfg.teacher.refresh_every,
                      ema_decay=cfg.teacher.ema_decay)
    teacher.model.to(accelerator.device)
    optimizer, scheduler = build_optimizer(student, cfg.optim, cfg.max_steps)
    # model: the wrapped student, which every forward pass of the student goes through (DDP/FSDP)
    model, optimizer = prepare(accelerator, student, optimizer, checkpoints=cfg.uses_checkpoints)
    builder = PromptBuilder.from_config(tokenizer, cfg.prompt)
    instruction = resolve_instruction(cfg.teacher.instruction, percent=cfg.teacher.percent, words=cfg.teacher.words)
    grader = task.grader
    generator = build_generator(cfg.rollout.backend, cfg.rollout.vllm, student, tokenizer, trust_remote_code=cfg.model.trust_remote_code,
                                max_new_tokens=max(cfg.rollout.max_new_tokens, cfg.eval.sampling.max_new_tokens
                                                   if cfg.eval else 0))
    stream = ProblemStream(problems, cfg.seed)
    # the teacher's weights go into checkpoints unless it is the student itself (live) or an adapter on it
    models = {"model": student, **({"teacher": teacher.model} if teacher.owns_weights else {})}
    run = TrainingRun(cfg, accelerator=accelerator, models=models, tokenizer=tokenizer, optimizer=optimizer,
                      scheduler=scheduler, stream=stream, builder=builder, eval_problems=eval_problems,
                      eval_generator=generator if cfg.rollout.backend == "vllm" else None)
    timer, precision = run.timer, run.precision
    pad_id = tokenizer.pad_token_id

    step, saved = run.resume()
    sync_weights(generator, student)  # a vLLM engine gets the resumed weights
    if saved is not None:
        teacher.refreshes = saved["refreshes"]
    bar = tqdm(total=cfg.max_steps, initial=step, desc=cfg.teacher.update + " selfdistill", dynamic_ncols=True,
               disable=not main)
    while step < cfg.max_steps:
        batch: list[Problem] = stream.take(cfg.batch_size)

        # Each rank generates and grades its slice of the prompts; then every rank holds the whole batch.
        mine = shard(len(batch), accelerator)
        with timer("generate"), precision():
            rollouts: list[Rollout] = generator.generate(
                [builder.student_ids(batch[i]) for i in mine], cfg.rollout, seed=cfg.seed * 1_000_003 + step,
                first_index=mine.start,
            )
        with timer("grade"):
            records = score_rollouts(batch, rollouts, grader)
        rollouts, records = map(list, zip(*gather(list(zip(rollouts, records)), accelerator)))
        correct = [r["correct"] for r in records]
        kept = keep_rollouts(correct, cfg.rollout_filter)
        teacher_prompts = {}
        with timer("prompts"):
            for i in kept:
                index = rollouts[i].prompt_index
                if index not in teacher_prompts:
                    teacher_prompts[index] = builder.teacher_ids(
                        batch[index], instruction=instruction, reference=cfg.teacher.reference_solution
                    )

        with timer("loss_backward"):
            kept_rollouts = [rollouts[i] for i in kept]
            loss = distill_backward(model, teacher, kept_rollouts,
                                    [teacher_prompts[r.prompt_index] for r in kept_rollouts], cfg, pad_id,
                                    accelerator=accelerator, precision=precision)

        with timer("step"):
            if not kept:  # the rollout filter kept nothing: no update, but not a failed step either
                grad_norm = float("nan")
            else:
                grad_norm, stepped = step_if_finite(student, optimizer, loss, cfg.optim.grad_clip)
                run.count_step(stepped)
                if stepped:
                    sync_weights(generator, student)
            scheduler.step()
        step += 1
        with timer("teacher_update"):
            refreshed = teacher.after_step(step, student)

        lengths = [r.num_tokens for r in rollouts]
        metrics = {
            "train/loss": loss,
            "train/grad_norm": grad_norm,
            "train/lr": scheduler.get_last_lr()[0],
            "train/skipped_steps": run.skipped,
            "rollout/accuracy": sum(correct) / len(correct),
            "rollout/mean_tokens": sum(lengths) / len(lengths),
            "rollout/truncation_rate": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
            "rollout/kept": len(kept),
            "teacher/refreshes": teacher.refreshes,
            "teacher/refreshed": refreshed,
        }
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", len=f"{metrics['rollout/mean_tokens']:.0f}",
                        acc=f"{metrics['rollout/accuracy']:.2f}")
        run.end_step(step, metrics, samples=records[:2], loop_state={"refreshes": teacher.refreshes})
    bar.close()
    final = out / "model"
    save_final(accelerator, model, tokenizer, final)
    finish_trackers(accelerator)
    return final
