"""Supervised fine-tuning: builds the demo's base model and SFT baselines (method: sft).

The task of `data.source` makes the corpus (crisp.data.tasks): for a problem file, its reference
solutions; for the synthetic task, every prompt kind the demo's methods use, answered in its style.
The loss covers the examples' masked-in response tokens only.

Under `accelerate launch` every rank reads the same batch and trains on a contiguous slice of its
rows; the loss is divided by the trained tokens of the whole batch (see crisp.distributed).
"""

from __future__ import annotations

import contextlib
import random
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from pydantic import Field, model_validator

from crisp.config import PositiveInt, Probability, RunConfig, Strict
from crisp.data.tasks import Probe, SFTExample, get_task
from crisp.distributed import reduce_sum, shard
from crisp.driver import EpochStream, Method, StepResult, Trainer, trainable_model
from crisp.modeling import (
    build_tiny_model,
    build_word_tokenizer,
    eval_mode,
    right_padded,
)
from crisp.prompts import PromptBuilder, prompt_texts


class SFTMix(Strict):
    """The synthetic task's SFT corpus: the share of each prompt kind (they add up to 1): plain (the
    student's prompt), the v1 and v2 instructions (CRISP's teachers), OPSD's reference-solution prompt,
    the thinking-free prompt; and the share of instructed and reference traces that start verbose."""

    plain: Probability = 0.45
    v1: Probability = 0.15
    v2: Probability = 0.15
    reference: Probability = 0.1
    thinking_free: Probability = 0.15
    verbose_prefix_fraction: Probability = 0.5

    def weights(self) -> dict[str, float]:
        return {kind: getattr(self, kind) for kind in ("plain", "v1", "v2", "reference", "thinking_free")}

    @model_validator(mode="after")
    def _fractions_add_up(self) -> SFTMix:
        total = sum(self.weights().values())
        if abs(total - 1) > 1e-6:
            raise ValueError(f"plain + v1 + v2 + reference + thinking_free must add up to 1 (got {total:g})")
        return self


class SFTConfig(RunConfig):
    method: Literal["sft"] = "sft"
    batch_tokens: PositiveInt = 2048
    mix: SFTMix = SFTMix()
    # Steps between lookup probes (synthetic task only; 0 = never): teacher-forced accuracy on the
    # held-out problems' operand and result tokens, per step index, logged as probe/* metrics.
    probe_every: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _probe_needs_the_synthetic_task(self) -> SFTConfig:
        if self.probe_every and self.data.source != "synthetic":
            raise ValueError("probe_every: the lookup probe needs data.source: synthetic")
        return self


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


def new_tiny_model(cfg: SFTConfig):
    """model.tiny: a new randomly initialised model and a word-level tokenizer covering the task."""
    texts = get_task(cfg.data.source).vocabulary_texts(cfg.seed) + prompt_texts()
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


def sft_step(
    model: torch.nn.Module,
    rows: list[SFTExample],
    pad_id: int,
    *,
    accelerator: Accelerator | None = None,
    precision=contextlib.nullcontext,
) -> float:
    """Cross-entropy on the response tokens of the batch `rows`, with backward; returns the batch's
    loss (over every rank). This rank trains on its contiguous slice of the rows; the loss is
    divided by the trained tokens of the whole batch, so the ranks' gradients add up to the batch's."""
    world = accelerator.num_processes if accelerator is not None else 1
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    mine = [rows[i] for i in shard(len(rows), accelerator)]
    input_ids, attention, labels = collate(mine or rows[:1], pad_id)  # (B, T) each
    my_tokens = sum(sum(e.loss_mask) for e in mine)
    trained_tokens = sum(sum(e.loss_mask) for e in rows)  # the whole batch's, on every rank
    with precision():
        loss = response_loss(model, input_ids.to(device), attention.to(device), labels.to(device))
    # This rank's mean, reweighted to its share of the batch's tokens, times the ranks that DDP
    # averages over (exactly 1 in one process); a rank without rows runs one row with weight 0.
    (loss * (world * my_tokens / trained_tokens)).backward()
    return reduce_sum({"loss": loss.item() * my_tokens}, accelerator)["loss"] / trained_tokens


class LookupProbe:
    """The task's probe (SFTConfig.probe_every) as an in-training evaluation: every rank runs it
    (FSDP forwards together)."""

    def __init__(self, probe: Probe, every: int):
        self.probe, self.every = probe, every

    def __call__(self, trainer: Trainer) -> dict[str, float]:
        with eval_mode(trainer.unwrapped):
            return self.probe(trainer.model)


class SFT(Method):
    label = "sft"

    def __init__(self, cfg: SFTConfig, accelerator: Accelerator):
        self.cfg = cfg
        self.model, self.tokenizer = trainable_model(cfg, new_tiny_model(cfg) if cfg.model.tiny else None)
        self.checkpointed = {"model": self.model}
        builder = PromptBuilder.from_config(self.tokenizer, cfg.prompt)
        task = get_task(cfg.data.source)
        examples = task.sft_examples(cfg, builder)
        probe = task.probe(builder) if cfg.probe_every else None
        self.evaluation = LookupProbe(probe, cfg.probe_every) if probe else None
        # length-bucketed batches of examples, in a fresh order every epoch
        self.stream = EpochStream(
            lambda rng: [
                [examples[i] for i in batch] for batch in length_bucketed_batches(examples, cfg.batch_tokens, rng)
            ],
            cfg.seed,
        )

    def step(self, step: int, trainer: Trainer) -> StepResult:
        (rows,) = self.stream.take(1)
        with trainer.timer("forward_backward"):
            loss = sft_step(
                trainer.model,
                rows,
                self.tokenizer.pad_token_id,
                accelerator=trainer.accelerator,
                precision=trainer.precision,
            )
        grad_norm = trainer.update(loss)
        tokens = sum(len(e.prompt_ids) + len(e.response_ids) for e in rows)
        return StepResult(
            {"train/loss": loss, "train/grad_norm": grad_norm}, progress={"loss": f"{loss:.3f}"}, tokens=tokens
        )


CONFIG, METHOD = SFTConfig, SFT
