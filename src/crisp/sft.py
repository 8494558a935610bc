"""Supervised fine-tuning: builds the demo's base model and SFT baselines.

On the synthetic task the corpus mixes plain (verbose) traces, instructed (concise) ones and, for
OPSD's teacher, concise traces under a reference-solution prompt; the last two sometimes start
verbose and switch; the loss covers response tokens only, and not the verbose
prefix of a switching trace. On any other problem source it trains on the reference solutions.

Under `accelerate launch` every rank reads the same batch and trains on a contiguous slice of its
rows; the loss is divided by the trained tokens of the whole batch (see crisp.distributed).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from crisp import checkpoint
from crisp.config import SFTConfig, dump_config
from crisp.data import synthetic
from crisp.data.loaders import load_problems
from crisp.distributed import (autocast, load_rng, prepare, reduce_sum, save_checkpoint, save_final,
                               shard)
from crisp.loop import open_run
from crisp.metrics import MetricsLog, Timer
from crisp.modeling import (build_tiny_model, build_word_tokenizer, eval_mode, load_model, load_tokenizer,
                            load_weights, prepare_for_training, right_padded)
from crisp.optim import build_optimizer, clip_and_check
from crisp.prompts import INSTRUCTIONS, REFERENCE_TEMPLATE, STUDENT_TEMPLATES, PromptBuilder, resolve_instruction
from crisp.tracking import finish_trackers


@dataclass(frozen=True)
class Example:
    prompt_ids: list[int]
    response_ids: list[int]
    loss_mask: list[int]  # one per response token: 1 = trained on


def synthetic_examples(cfg: SFTConfig, builder: PromptBuilder) -> list[Example]:
    tokenizer = builder.tokenizer
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    instruction = resolve_instruction(cfg.mix.instruction)
    rng = random.Random(cfg.seed)
    prompts, traces = [], []
    for chain in synthetic.train_chains(cfg.seed, cfg.data.size, tuple(cfg.data.levels)):
        problem = synthetic.to_problem(chain, 0, "train")
        draw = rng.random()
        kind = ("instructed" if draw < cfg.mix.instructed_fraction else
                "reference" if draw < cfg.mix.instructed_fraction + cfg.mix.reference_fraction else "plain")
        lines = synthetic.sft_example(rng, chain, kind=kind, verbose_prefix=rng.random() < cfg.mix.verbose_prefix_fraction)
        if kind == "plain":
            text = builder.student_text(problem)
        else:
            text = builder.teacher_text(problem, instruction=instruction if kind == "instructed" else None,
                                        reference=kind == "reference")
        prompts.append(builder.render(text))
        traces.append(lines)
    # One batched call to the Rust tokenizer: per-call and per-text wrapper overhead dominates here.
    def encode(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]

    prompt_ids = encode(prompts)
    line_ids = iter(encode([line.text for lines in traces for line in lines]))
    examples = []
    for prompt, lines in zip(prompt_ids, traces):
        response, mask = [], []
        for i, line in enumerate(lines):
            piece = next(line_ids) + (newline if i < len(lines) - 1 else [tokenizer.eos_token_id])
            response += piece
            mask += [0 if line.in_prefix else 1] * len(piece)
        examples.append(Example(prompt, response, mask))
    return examples


@dataclass(frozen=True)
class ProbeTrace:
    ids: list[int]  # prompt + response
    targets: list[tuple[str, int, list[int]]]  # (operand | result, step, positions that predict its tokens)


def probe_traces(builder: PromptBuilder) -> list[ProbeTrace]:
    """Slip-free verbose traces of the held-out problems under plain prompts, tokenized line by line
    as SFT does, with the positions that predict each step line's operation and result tokens."""
    tokenizer = builder.tokenizer
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    rng = random.Random(0)
    traces = []
    for chain in synthetic.test_chains():
        problem = synthetic.to_problem(chain, 0, "test")
        ids = tokenizer(builder.render(builder.student_text(problem)), add_special_tokens=False)["input_ids"]
        targets = []
        for line in synthetic.sample_trace(rng, chain, synthetic.VERBOSE, slip=0.0):
            encoded = tokenizer(line.text, add_special_tokens=False, return_offsets_mapping=True)
            spans = synthetic.step_spans(line.text)
            if spans is not None:
                step, *char_spans = spans
                for kind, (begin, end) in zip(("operand", "result"), char_spans):
                    inside = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if a < end and b > begin]
                    targets.append((kind, step, [len(ids) + i - 1 for i in inside]))
            ids = ids + encoded["input_ids"] + newline
        traces.append(ProbeTrace(ids, targets))
    return traces


@torch.no_grad()
def lookup_probe(model, traces: list[ProbeTrace], pad_id: int, batch_size: int = 50) -> dict[str, float]:
    """Teacher-forced: the share of step lines, per step index, whose operation (the lookup) or result
    (the arithmetic) tokens are all the model's argmax."""
    hits: dict[str, list[bool]] = {}
    device = next(model.parameters()).device
    for start in range(0, len(traces), batch_size):
        batch = traces[start : start + batch_size]
        input_ids, attention = right_padded([t.ids for t in batch], pad_id)  # (B, T)
        predicted = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.argmax(-1).cpu()
        for row, trace in enumerate(batch):
            for kind, step, positions in trace.targets:
                right = all(predicted[row, p] == trace.ids[p + 1] for p in positions)
                hits.setdefault(f"probe/{kind}_step{step}", []).append(right)
    return {name: sum(values) / len(values) for name, values in sorted(hits.items())}


def solution_examples(cfg: SFTConfig, builder: PromptBuilder) -> list[Example]:
    tokenizer = builder.tokenizer
    examples = []
    for problem in load_problems(cfg.data.source, limit=cfg.data.limit):
        if not problem.solution:
            raise ValueError(f"{cfg.data.source}: problem {problem.id} has no solution to train on")
        response = tokenizer(problem.solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append(Example(builder.student_ids(problem), response, [1] * len(response)))
    return examples


def length_bucketed_batches(examples: list[Example], batch_tokens: int, rng: random.Random) -> list[list[int]]:
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


def collate(examples: list[Example], pad_id: int):
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
        texts = synthetic.vocabulary_texts(cfg.seed)
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
    examples = synthetic_examples(cfg, builder) if cfg.data.source == "synthetic" else solution_examples(cfg, builder)
    probes = probe_traces(builder) if cfg.probe_every else []
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
        probe = {}
        if probes and (step % cfg.probe_every == 0 or step == cfg.max_steps):  # every rank (FSDP forwards together)
            probe_start = time.perf_counter()
            with eval_mode(model):
                probe = lookup_probe(wrapped, probes, tokenizer.pad_token_id)
            window_start += time.perf_counter() - probe_start  # not training time
        if step % cfg.log_every == 0 or step == cfg.max_steps:  # every rank: reduce_sum is collective
            loss = reduce_sum({"loss": loss.item() * my_tokens}, accelerator)["loss"] / trained_tokens
            elapsed = time.perf_counter() - window_start
            metrics = {"train/loss": loss, "train/grad_norm": grad_norm, "train/lr": scheduler.get_last_lr()[0],
                       "train/tokens_per_s": tokens_seen / elapsed, **timer.pop(), **probe}
            if main:
                log.write(step, metrics)
            bar.set_postfix(loss=f"{loss:.3f}")
            tokens_seen, window_start = 0, time.perf_counter()
        elif probe and main:
            log.write(step, probe)
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
