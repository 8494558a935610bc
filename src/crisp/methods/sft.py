"""Supervised fine-tuning: builds the demo's base model and SFT baselines.

The task of `data.source` makes the corpus (crisp.data.tasks): for a problem file, its reference
solutions; for the synthetic task, every prompt kind the demo's methods use, answered in its style.
The loss covers the examples' masked-in response tokens only.

Under `accelerate launch` every rank reads the same batch and trains on a contiguous slice of its
rows; the loss is divided by the trained tokens of the whole batch (see crisp.distributed).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from crisp import checkpoint
from crisp.config import SFTConfig, dump_config
from crisp.data.tasks import SFTExample, get_task
from crisp.distributed import (autocast, load_rng, prepare, reduce_sum, save_checkpoint, save_final,
                               shard)
from crisp.loop import open_run
from crisp.metrics import MetricsLog, Timer
from crisp.modeling import (build_tiny_model, build_word_tokenizer, eval_mode, load_model, load_tokenizer,
                            load_weights, prepare_for_training, right_padded)
from crisp.optim import build_optimizer, clip_and_check
from crisp.prompts import INSTRUCTIONS, REFERENCE_TEMPLATE, STUDENT_TEMPLATES, PromptBuilder
from crisp.tracking import finish_trackers


def length_bucketed_batches(examples: list[SFTExample], batch_tokens: int, rng: random.Random) -> list[list[int]]:
    """Indices grouped so that each batch's padded size (rows x longest) stays under batch_tokens."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids) + len(examples[i].response_ids))
    batches, current, longest = [], [], 0
    for i in order:
        length = len(examples[i].prompt_ids) + len(examples[i].response_ids)
        if current and max(longest, length) * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, length)
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def collate(examples: list[SFTExample], pad_id: int):
    """Right-padded input ids, attention mask and next-token labels (-100 where not trained)."""
    input_ids, attention = right_padded([e.prompt_ids + e.response_ids for e in examples], pad_id)  # (B, T)
    labels = torch.full_like(input_ids, -100)  # (B, T)
    for row, e in enumerate(examples):
        start = len(e.prompt_ids)
        targets = torch.tensor(e.response_ids)
        targets[torch.tensor(e.loss_mask) == 0] = -100
        labels[row, start : start + len(targets)] = targets
    return input_ids, attention, labels


def response_loss(model, input_ids, attention, labels) -> torch.Tensor:
    """Cross-entropy averaged over the trained tokens (labels != -100)."""
    logits = model(input_ids=input_ids, attention_mask=attention).logits  # (B, T, V)
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def build_model_and_tokenizer(cfg: SFTConfig):
    if cfg.model.tiny is not None:
        texts = get_task(cfg.data.source).vocabulary_texts(cfg.seed)
        texts += list(INSTRUCTIONS.values()) + list(STUDENT_TEMPLATES.values()) + [REFERENCE_TEMPLATE]
        tokenizer = build_word_tokenizer(texts)
        spec = cfg.model.tiny
        model = build_tiny_model(
            tokenizer,
            architecture=spec.architecture,
            hidden_size=spec.hidden_size,
            num_layers=spec.num_layers,
            num_heads=spec.num_heads,
            intermediate_size=spec.intermediate_size,
            max_positions=spec.max_positions,
            seed=cfg.seed,
        )
        return model, tokenizer
    tokenizer = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    model = load_model(cfg.model.path, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
    return model, tokenizer


def train_sft(cfg: SFTConfig) -> Path:
    """Run SFT; returns the directory of the final model (output_dir/model)."""
    accelerator, out = open_run(cfg)
    main = accelerator.is_main_process  # only rank 0 writes files
    model, tokenizer = build_model_and_tokenizer(cfg)
    model = prepare_for_training(model, gradient_checkpointing=cfg.model.gradient_checkpointing, lora=cfg.model.lora)
    builder = PromptBuilder.from_config(tokenizer, cfg.prompt)
    task = get_task(cfg.data.source)
    examples = task.sft_examples(cfg, builder)
    probe = task.probe(builder) if cfg.probe_every else None
    optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.max_steps)
    wrapped, optimizer = prepare(accelerator, model, optimizer,  # forwards go through the wrapper (DDP)
                                 checkpoints=cfg.uses_checkpoints)
    log = MetricsLog(out / "metrics.jsonl", accelerator)  # also to the trackers
    timer = Timer()

    step = 0
    resume_from = checkpoint.resolve_resume(cfg.resume, out)
    if resume_from is not None:
        state = checkpoint.load_state(resume_from)
        load_weights(model, resume_from / "model")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        load_rng(accelerator, state)
        step, epoch, position = state["step"], state["epoch"], state["position"]

    def epoch_batches(epoch: int) -> list[list[int]]:  # deterministic shuffle per epoch
        return length_bucketed_batches(examples, cfg.batch_tokens, random.Random(cfg.seed * 1000 + epoch))

    if resume_from is None:
        epoch, position = 0, 0
    batches = epoch_batches(epoch)
    if main:
        log.truncate_after(step)
    model.train()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="sft", dynamic_ncols=True, disable=not main)
    tokens_seen, window_start = 0, time.perf_counter()
    while step < cfg.max_steps:
        if position >= len(batches):
            epoch, position = epoch + 1, 0
            batches = epoch_batches(epoch)
        with timer("data"):
            rows = [examples[i] for i in batches[position]]
            position += 1
            mine = [rows[i] for i in shard(len(rows), accelerator)]
            input_ids, attention, labels = collate(mine or rows[:1], tokenizer.pad_token_id)  # (B, T) each
            my_tokens = sum(sum(e.loss_mask) for e in mine)
            trained_tokens = sum(sum(e.loss_mask) for e in rows)  # the whole batch's, on every rank
        with timer("forward_backward"):
            with autocast(cfg.mixed_precision, accelerator.device):
                loss = response_loss(wrapped, input_ids.to(accelerator.device), attention.to(accelerator.device),
                                     labels.to(accelerator.device))
            # This rank's mean, reweighted to its share of the batch's tokens, times the ranks that DDP
            # averages over (exactly 1 in one process); a rank without rows runs one row with weight 0.
            (loss * (accelerator.num_processes * my_tokens / trained_tokens)).backward()
        with timer("step"):
            grad_norm = clip_and_check(model, cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += sum(len(e.prompt_ids) + len(e.response_ids) for e in rows)
        bar.update(1)
        probed = {}
        if probe and (step % cfg.probe_every == 0 or step == cfg.max_steps):  # every rank (FSDP forwards together)
            probe_start = time.perf_counter()
            with eval_mode(model):
                probed = probe(wrapped)
            window_start += time.perf_counter() - probe_start  # not training time
        if step % cfg.log_every == 0 or step == cfg.max_steps:  # every rank: reduce_sum is collective
            loss = reduce_sum({"loss": loss.item() * my_tokens}, accelerator)["loss"] / trained_tokens
            elapsed = time.perf_counter() - window_start
            metrics = {"train/loss": loss, "train/grad_norm": grad_norm, "train/lr": scheduler.get_last_lr()[0],
                       "train/tokens_per_s": tokens_seen / elapsed, **timer.pop(), **probed}
            if main:
                log.write(step, metrics)
            bar.set_postfix(loss=f"{loss:.3f}")
            tokens_seen, window_start = 0, time.perf_counter()
        elif probed and main:
            log.write(step, probed)
        if cfg.save_every and (step % cfg.save_every == 0 or step == cfg.max_steps):
            save_checkpoint(accelerator, out / "checkpoints", step, models={"model": (model, tokenizer)},
                            state={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                   "epoch": epoch, "position": position}, keep=cfg.keep_checkpoints)
    bar.close()
    final = out / "model"
    save_final(accelerator, wrapped, tokenizer, final)
    if main:
        dump_config(cfg, final / "crisp_config.yaml")  # marks the model complete, and what built it
    finish_trackers(accelerator)
    return final
