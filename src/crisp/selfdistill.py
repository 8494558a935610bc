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
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from crisp import checkpoint
from crisp.config import SelfDistillConfig, dump_config
from crisp.data import synthetic
from crisp.data.loaders import load_problems
from crisp.data.problems import Problem
from crisp.evaluate import default_grader, evaluate, score_rollouts
from crisp.losses import divergence_sum
from crisp.metrics import MetricsLog, Timer
from crisp.modeling import load_model, load_tokenizer, save_model
from crisp.optim import build_optimizer, step_if_finite
from crisp.prompts import PromptBuilder, resolve_instruction
from crisp.rollout import HFGenerator, Rollout
from crisp.teacher import Teacher


def training_problems(cfg) -> list[Problem]:
    if cfg.data.source == "synthetic":
        return synthetic.train_problems(cfg.seed, cfg.data.size, tuple(cfg.data.levels))
    return load_problems(cfg.data.source, limit=cfg.data.limit)


def keep_rollouts(correct: Sequence[bool], rule: str) -> list[int]:
    """Indices of the rollouts that train: all, correct-only, or incorrect-only."""
    if rule == "all":
        return list(range(len(correct)))
    wanted = rule == "correct"
    return [i for i, c in enumerate(correct) if c == wanted]


def response_hidden(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int):
    """Final hidden states at the positions that predict each response token, rows concatenated.

    Sequence b is prompt_b + response_b, right-padded; response token j sits at position
    len(prompt_b) + j and is predicted from position len(prompt_b) + j - 1. Prompts of different
    lengths (student vs teacher) therefore line up on the same response tokens.
    """
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    input_ids = torch.full((len(lengths), max(lengths)), pad_id, dtype=torch.long)  # (B, T)
    attention = torch.zeros_like(input_ids)  # (B, T)
    rows, cols = [], []
    for b, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[b, : lengths[b]] = torch.tensor(list(p) + list(r))
        attention[b, : lengths[b]] = 1
        rows += [b] * len(r)
        cols += range(len(p) - 1, len(p) - 1 + len(r))
    device = next(model.parameters()).device
    hidden = model.base_model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                              use_cache=False).last_hidden_state  # (B, T, H)
    return hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]  # (N, H)


def distill_loss_sum(student, teacher_model, student_prompts, teacher_prompts, responses, cfg, pad_id):
    """Sum over the response tokens of the per-token divergence (the caller divides by the count).

    The teacher runs under inference mode (no autograd bookkeeping at all) and only its hidden
    states at the response positions reach the loss; both LM heads run inside `divergence_sum`,
    chunk by chunk, so neither side's full-vocabulary logits are ever held.
    """
    student_hidden = response_hidden(student, student_prompts, responses, pad_id)  # (N, H)
    with torch.inference_mode():
        teacher_hidden = response_hidden(teacher_model, teacher_prompts, responses, pad_id)  # (N, H)
    tokens = torch.tensor([t for r in responses for t in r], device=student_hidden.device)  # (N,)
    student_head, teacher_head = student.get_output_embeddings(), teacher_model.get_output_embeddings()
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


def distill_backward(student, teacher_model, rollouts: Sequence[Rollout], teacher_prompts: Sequence[Sequence[int]],
                     cfg, pad_id: int) -> float:
    """Loss and backward of one step: the mean divergence per response token (nan if there is none).

    Rollouts go through in micro-batches of `cfg.micro_batch_size`; each micro-batch's summed
    divergence is divided by the step's token count, so the accumulated gradient is that of one big
    batch. With more than one micro-batch the rollouts are first ordered by length, so that each
    micro-batch pads to a length close to its own (the gradient is the same, only summed in
    another order).
    """
    num_tokens = sum(r.num_tokens for r in rollouts)
    order = list(range(len(rollouts)))
    if len(rollouts) > cfg.micro_batch_size:
        order.sort(key=lambda i: len(rollouts[i].prompt_ids) + rollouts[i].num_tokens)
    loss_total = 0.0
    for start in range(0, len(order), cfg.micro_batch_size):
        micro = order[start : start + cfg.micro_batch_size]
        loss_sum = distill_loss_sum(
            student,
            teacher_model,
            [rollouts[i].prompt_ids for i in micro],
            [teacher_prompts[i] for i in micro],
            [rollouts[i].token_ids for i in micro],
            cfg,
            pad_id,
        )
        (loss_sum / num_tokens).backward()
        loss_total += loss_sum.item()
    return loss_total / num_tokens if num_tokens else float("nan")


def eval_metrics(summary: dict) -> dict:
    metrics = {"eval/accuracy": summary["accuracy"], "eval/mean_tokens": summary["mean_tokens"]}
    for level, figures in summary["by_difficulty"].items():
        metrics[f"eval/L{level}_accuracy"] = figures["accuracy"]
        metrics[f"eval/L{level}_mean_tokens"] = figures["mean_tokens"]
    return metrics


def train_selfdistill(cfg: SelfDistillConfig) -> Path:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    problems = training_problems(cfg)  # bad data fails here, before any model is loaded
    eval_problems = load_problems(cfg.eval.benchmark, limit=cfg.eval.limit) if cfg.eval else []
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    student = load_model(cfg.model.path, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
    student.train()
    teacher = Teacher(student, update=cfg.teacher.update, refresh_every=cfg.teacher.refresh_every,
                      ema_decay=cfg.teacher.ema_decay)
    builder = PromptBuilder(tokenizer, template=cfg.prompt.template, system=cfg.prompt.system,
                            enable_thinking=cfg.prompt.enable_thinking)
    instruction = resolve_instruction(cfg.teacher.instruction, percent=cfg.teacher.percent, words=cfg.teacher.words)
    grader = default_grader(problems)
    generator = HFGenerator(student, tokenizer)
    optimizer, scheduler = build_optimizer(student, cfg.optim, cfg.max_steps)
    log = MetricsLog(out / "metrics.jsonl")
    timer = Timer()
    pad_id = tokenizer.pad_token_id

    step, epoch, position, skipped, consecutive_skips = 0, 0, 0, 0, 0
    resume_from = checkpoint.resolve_resume(cfg.resume, out)
    if resume_from is not None:
        state = checkpoint.load_state(resume_from)
        student.load_state_dict(load_model(str(resume_from / "model")).state_dict())
        if teacher.owns_weights:
            teacher.model.load_state_dict(load_model(str(resume_from / "teacher")).state_dict())
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        step, epoch, position = state["step"], state["epoch"], state["position"]
        skipped, consecutive_skips = state["skipped"], state["consecutive_skips"]
        teacher.refreshes = state["refreshes"]

    def epoch_order(epoch: int) -> list[int]:
        order = list(range(len(problems)))
        random.Random(cfg.seed * 1000 + epoch).shuffle(order)
        return order

    order = epoch_order(epoch)
    log.truncate_after(step)
    if step == 0:
        (out / "rollouts.jsonl").unlink(missing_ok=True)
    bar = tqdm(total=cfg.max_steps, initial=step, desc=cfg.teacher.update + " selfdistill", dynamic_ncols=True)
    while step < cfg.max_steps:
        batch: list[Problem] = []
        while len(batch) < cfg.batch_size:
            if position == len(order):
                epoch, position = epoch + 1, 0
                order = epoch_order(epoch)
            batch.append(problems[order[position]])
            position += 1

        with timer("generate"):
            rollouts: list[Rollout] = generator.generate(
                [builder.student_ids(p) for p in batch], cfg.rollout, seed=cfg.seed * 1_000_003 + step
            )
        with timer("grade"):
            records = score_rollouts(batch, rollouts, grader)
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
            loss = distill_backward(student, teacher.model, kept_rollouts,
                                    [teacher_prompts[r.prompt_index] for r in kept_rollouts], cfg, pad_id)

        with timer("step"):
            if not kept:  # the rollout filter kept nothing: no update, but not a failed step either
                grad_norm = float("nan")
            else:
                grad_norm, stepped = step_if_finite(student, optimizer, loss, cfg.optim.grad_clip)
                skipped, consecutive_skips = (skipped, 0) if stepped else (skipped + 1, consecutive_skips + 1)
            scheduler.step()
        step += 1
        with timer("teacher_update"):
            refreshed = teacher.after_step(step, student)

        lengths = [r.num_tokens for r in rollouts]
        metrics = {
            "train/loss": loss,
            "train/grad_norm": grad_norm,
            "train/lr": scheduler.get_last_lr()[0],
            "train/skipped_steps": skipped,
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
        if consecutive_skips >= cfg.max_skipped_steps:
            raise RuntimeError(
                f"{consecutive_skips} consecutive steps had a non-finite loss or gradient (step {step}); "
                f"stopping. The last good checkpoint is in {out / 'checkpoints'}; lower optim.lr or check the data."
            )
        if cfg.eval and (step == cfg.max_steps or (cfg.eval.every and step % cfg.eval.every == 0)):
            with timer("eval"):
                _, summary = evaluate(student, tokenizer, eval_problems, builder=builder, sampling=cfg.eval.sampling,
                                      k=cfg.eval.k, seed=cfg.seed, batch_size=cfg.eval.batch_size, progress=False)
            metrics.update(eval_metrics(summary))
        if step % cfg.log_every == 0 or step == cfg.max_steps or "eval/accuracy" in metrics:
            log.write(step, {**metrics, **timer.pop()})
            with (out / "rollouts.jsonl").open("a") as f:
                for r in records[:2]:
                    f.write(json.dumps({"step": step, **r}) + "\n")
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            models = {"model": (student, tokenizer)}
            if teacher.owns_weights:
                models["teacher"] = (teacher.model, None)
            checkpoint.save(out / "checkpoints", step, models=models, keep=cfg.keep_checkpoints, state={
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                "position": position, "skipped": skipped, "consecutive_skips": consecutive_skips,
                "refreshes": teacher.refreshes})
    bar.close()
    final = out / "model"
    save_model(student, tokenizer, final)
    return final
