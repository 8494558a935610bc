"""Supervised fine-tuning: builds the demo's base model and SFT baselines.

On the synthetic task the corpus mixes plain (verbose) traces and instructed (concise) ones, some
of which start verbose and switch; the loss covers response tokens only, and not the verbose
prefix of a switching trace. On any other problem source it trains on the reference solutions.
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
from crisp.metrics import MetricsLog, Timer
from crisp.modeling import build_tiny_model, build_word_tokenizer, load_model, load_tokenizer, save_model
from crisp.optim import build_optimizer, clip_and_check
from crisp.prompts import INSTRUCTIONS, REFERENCE_TEMPLATE, STUDENT_TEMPLATES, PromptBuilder, resolve_instruction


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
        instructed, lines = synthetic.sft_example(
            rng,
            chain,
            instructed=rng.random() < cfg.mix.instructed_fraction,
            verbose_prefix=rng.random() < cfg.mix.verbose_prefix_fraction,
        )
        text = builder.teacher_text(problem, instruction=instruction, reference=False) if instructed else (
            builder.student_text(problem))
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
    width = max(len(e.prompt_ids) + len(e.response_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    attention = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)  # (B, T)
    for row, e in enumerate(examples):
        ids = e.prompt_ids + e.response_ids
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        start = len(e.prompt_ids)
        targets = torch.tensor(e.response_ids)
        targets[torch.tensor(e.loss_mask) == 0] = -100
        labels[row, start : len(ids)] = targets
    return input_ids, attention, labels


def response_loss(model, input_ids, attention, labels) -> torch.Tensor:
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
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model, tokenizer = build_model_and_tokenizer(cfg)
    builder = PromptBuilder(tokenizer, template=cfg.prompt.template, system=cfg.prompt.system,
                            enable_thinking=cfg.prompt.enable_thinking)
    examples = synthetic_examples(cfg, builder) if cfg.data.source == "synthetic" else solution_examples(cfg, builder)
    optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.max_steps)
    log = MetricsLog(out / "metrics.jsonl")
    timer = Timer()

    step = 0
    resume_from = checkpoint.resolve_resume(cfg.resume, out)
    if resume_from is not None:
        state = checkpoint.load_state(resume_from)
        model.load_state_dict(load_model(str(resume_from / "model")).state_dict())
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        step, epoch, position = state["step"], state["epoch"], state["position"]

    def epoch_batches(epoch: int) -> list[list[int]]:  # deterministic shuffle per epoch
        return length_bucketed_batches(examples, cfg.batch_tokens, random.Random(cfg.seed * 1000 + epoch))

    if resume_from is None:
        epoch, position = 0, 0
    batches = epoch_batches(epoch)
    log.truncate_after(step)
    model.train()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="sft", dynamic_ncols=True)
    tokens_seen, window_start = 0, time.perf_counter()
    while step < cfg.max_steps:
        if position >= len(batches):
            epoch, position = epoch + 1, 0
            batches = epoch_batches(epoch)
        with timer("data"):
            input_ids, attention, labels = collate([examples[i] for i in batches[position]], tokenizer.pad_token_id)
            position += 1
        with timer("forward_backward"):
            loss = response_loss(model, input_ids, attention, labels)
            loss.backward()
        with timer("step"):
            grad_norm = clip_and_check(model, cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += int(attention.sum())
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            elapsed = time.perf_counter() - window_start
            metrics = {"train/loss": loss.item(), "train/grad_norm": grad_norm, "train/lr": scheduler.get_last_lr()[0],
                       "train/tokens_per_s": tokens_seen / elapsed, **timer.pop()}
            log.write(step, metrics)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            tokens_seen, window_start = 0, time.perf_counter()
        if cfg.save_every and (step % cfg.save_every == 0 or step == cfg.max_steps):
            checkpoint.save(out / "checkpoints", step, models={"model": (model, tokenizer)},
                            state={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                   "epoch": epoch, "position": position}, keep=cfg.keep_checkpoints)
    bar.close()
    final = out / "model"
    save_model(model, tokenizer, final)
    dump_config(cfg, final / "crisp_config.yaml")  # marks the model complete, and what built it
    return final
