"""The built-in synthetic reasoning task: running-total arithmetic chains, written like a reasoning model.

A problem starts from a number and applies 1-4 additions/subtractions of 1-9 (one per line, numbered
"Second -3"), the running total staying in 0..20; its difficulty is the number of operations.
Each step line quotes its operation ("Second -3: 9 - 3 = 6."), so a small model finds the operand
by matching the ordinal word, the simplest kind of copying a 2-layer transformer learns. A signed
operand is one token: copying "- 3" as two tokens needs the token two back, which the demo's 2-layer
model had not learned by step 2,000 in 3 of 4 seeds (the digit right 30-74% of the time, the sign 86-100%).

A response has a thinking section and an answer section, as a hybrid reasoning model (Qwen3) writes:
``<think>\\n...lines...\\n</think>\\n\\nAnswer: 6``. Under a thinking-free prompt (the chat prompt
with ``<think>\\n\\n</think>\\n\\n`` appended) the model writes a short direct solution instead.

Every line of the thinking section is a random decision whose probability depends on the style
(which prompt the writer answers). The decisions stand for what reasoning models are observed to do:

- Slips: from the third step on (the "risky" steps) the writer states one wrong result (r + 1; r - 1
  at 20) with probability `slip`: error rates grow with the length of a chain.
- Checks, the redundancy that helps: "Check: 8 + 5 = 13." recomputes a step and fixes a slip
  ("Check: 8 + 5 is not 14 but 13."). Only checks after risky steps carry weight.
- Second-guessing, the verbosity that hurts: "Hmm, wait: is 8 + 5 really 13? Yes, 13." usually
  confirms, but revises a right total into the wrong one with probability FLIP_RIGHT_TO_WRONG (and
  fixes a wrong one with FLIP_WRONG_TO_RIGHT): the "inversion errors" of extra reflection rounds,
  rare per round, more frequent in long responses.
- Re-read loops: "Let me re-read the problem: ..." repeats ("... again: ...") with probability
  `reread_again` each time, up to MAX_REREAD_REPEATS: the repetition that runs hard problems into the
  length cap.
- Padding: a restatement, "Let me think step by step.", a summary line; neutral.

The instructions are not perfectly calibrated, so prompting is not the optimum and methods can be
told apart: under v1 ("be concise") the writer checks only its last step, which on a 4-step chain
skips the check of risky step 3 (over-compression); under v2 (difficulty-aware) it checks the last
step and every risky step. The ideal policy checks the risky steps only. Under OPSD's reference
prompt the writer copies the totals from the solution: no slips, no checks. Every instructed
decision is near-deterministic (<= 0.05 or >= 0.97).

Instructed and reference training examples sometimes start verbose and switch to their style at a
line boundary (the verbose prefix is excluded from the loss), so that an instructed teacher has an
opinion wherever the student is.

The parameters below are fixed before any method is run on this task; `expected_figures` gives the
accuracy and length a model that learned the process exactly would reach at a given temperature.
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from crisp.anatomy import THINK_CLOSE, THINK_OPEN
from crisp.data.problems import Problem
from crisp.data.tasks import SFTExample, Task

if TYPE_CHECKING:  # (crisp.methods imports the tasks)
    from crisp.methods.sft import SFTConfig
    from crisp.prompts import PromptBuilder

LEVELS = (1, 2, 3, 4)
ORDINALS = ("First", "Second", "Third", "Fourth")
MAX_TOTAL = 20
FIRST_RISKY_STEP = 3
FLIP_RIGHT_TO_WRONG = 0.15
FLIP_WRONG_TO_RIGHT = 0.5
MAX_REREAD_REPEATS = 5
TEST_SEED = 20_240_601
TEST_PER_LEVEL = 50


@dataclass(frozen=True)
class Style:
    """The probability of each decision a writer makes."""

    restate: float
    think: float
    check_safe: float  # a check after a step before the third
    check_risky: float  # after a step from the third on
    check_last: float  # after the last step (the larger of this and the above applies there)
    second_guess: float  # "Hmm, wait: is ... really ...?" after a step
    flip_right: float  # a second-guess revises a right total into the wrong one
    flip_wrong: float  # ... or a wrong total into the right one
    reread: float
    reread_again: float
    summary: float
    slip: float  # a wrong result on a risky step
    thinking: bool = True  # writes a <think> section (False: the thinking-free answer)

    def check(self, step: int, level: int) -> float:
        risky = self.check_risky if step >= FIRST_RISKY_STEP else self.check_safe
        return max(risky, self.check_last) if step == level else risky

    def at_temperature(self, temperature: float) -> Style:
        """The style a model that learned it exactly samples at `temperature`: every decision is a
        choice between two tokens, p -> p^(1/T) / (p^(1/T) + (1-p)^(1/T))."""

        def sharpen(p: float) -> float:
            a, b = p ** (1 / temperature), (1 - p) ** (1 / temperature)
            return a / (a + b)

        numbers = {f.name: sharpen(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "thinking"}
        return dataclasses.replace(self, **numbers)


VERBOSE = Style(
    restate=0.9,
    think=0.9,
    check_safe=0.85,
    check_risky=0.85,
    check_last=0.85,
    second_guess=0.5,
    flip_right=FLIP_RIGHT_TO_WRONG,
    flip_wrong=FLIP_WRONG_TO_RIGHT,
    reread=0.9,
    reread_again=0.5,
    summary=0.9,
    slip=0.3,
)
CONCISE_V1 = dataclasses.replace(
    VERBOSE,
    restate=0.03,
    think=0.03,
    check_safe=0.03,
    check_risky=0.03,
    check_last=0.97,
    second_guess=0.02,
    reread=0.03,
    reread_again=0.0,
    summary=0.05,
)
CONCISE_V2 = dataclasses.replace(CONCISE_V1, check_risky=0.97)
REFERENCE = dataclasses.replace(
    VERBOSE,
    restate=0.0,
    think=0.0,
    check_safe=0.0,
    check_risky=0.0,
    check_last=0.0,
    second_guess=0.0,
    reread=0.0,
    reread_again=0.0,
    summary=0.0,
    slip=0.0,
)
# a direct answer rarely verifies: thinking-free is worse than thinking on long chains, as for real hybrid models
THINKING_FREE = dataclasses.replace(REFERENCE, check_safe=0.03, check_risky=0.2, slip=0.3, thinking=False)
IDEAL = dataclasses.replace(REFERENCE, check_risky=1.0, slip=0.3)  # checks exactly the risky steps

# The prompt kinds of the SFT corpus and the style each is answered in.
STYLES = {"plain": VERBOSE, "v1": CONCISE_V1, "v2": CONCISE_V2, "reference": REFERENCE, "thinking_free": THINKING_FREE}


@dataclass(frozen=True)
class Chain:
    start: int
    operands: tuple[int, ...]  # signed: +3 adds 3, -5 subtracts 5

    @property
    def level(self) -> int:
        return len(self.operands)

    def totals(self) -> list[int]:
        totals = [self.start]
        for x in self.operands:
            totals.append(totals[-1] + x)
        return totals

    @property
    def answer(self) -> int:
        return self.totals()[-1]

    def operation(self, index: int) -> str:
        """The operation as the question words it, e.g. "Third -1" (index counts from 0)."""
        return f"{ORDINALS[index]} {self.operands[index]:+d}"

    def operations(self) -> str:
        return ", ".join(self.operation(i) for i in range(self.level))

    def question(self) -> str:
        ops = "".join(self.operation(i) + "\n" for i in range(self.level))
        return f"Start with {self.start}.\n{ops}What is the result?"


@dataclass(frozen=True)
class Response:
    """A sampled response: its text, and how many of its leading characters are the verbose prefix
    of a switching trace (not trained on)."""

    text: str
    prefix_chars: int = 0


def sample_chain(rng: random.Random, level: int) -> Chain:
    start = rng.randint(1, MAX_TOTAL)
    total, operands = start, []
    for _ in range(level):
        choices = [x for x in range(-9, 10) if x != 0 and 0 <= total + x <= MAX_TOTAL]
        x = rng.choice(choices)
        operands.append(x)
        total += x
    return Chain(start, tuple(operands))


def _op(x: int) -> str:
    return f"+ {x}" if x > 0 else f"- {-x}"


def wrong_value(correct: int) -> int:
    """The one wrong result a slip or a second-guess states."""
    return correct + 1 if correct < MAX_TOTAL else correct - 1


def sample_response(rng: random.Random, chain: Chain, style: Style, *, switch_at: int | None = None) -> Response:
    """One response. Decisions before thinking line `switch_at` use VERBOSE, later ones `style`; the
    writer's slip rate is always `style`'s (a reference reader copies every total)."""
    lines: list[str] = []
    prefix_lines = 0

    def current() -> Style:
        return VERBOSE if switch_at is not None and len(lines) < switch_at else style

    def emit(text: str) -> None:
        nonlocal prefix_lines
        if switch_at is not None and len(lines) < switch_at:
            prefix_lines += 1
        lines.append(text)

    def chance(name: str, p: float | None = None) -> bool:
        return rng.random() < (getattr(current(), name) if p is None else p)

    if chance("restate"):
        emit(f"Restate: we start at {chain.start} and apply the operations in order.")
    if chance("think"):
        emit("Let me think step by step.")
    total = chain.start
    for step, x in enumerate(chain.operands, start=1):
        correct = total + x
        stated = wrong_value(correct) if step >= FIRST_RISKY_STEP and rng.random() < style.slip else correct
        emit(f"{chain.operation(step - 1)}: {total} {_op(x)} = {stated}.")
        if chance("check", current().check(step, chain.level)):
            if stated == correct:
                emit(f"Check: {total} {_op(x)} = {correct}.")
            else:
                emit(f"Check: {total} {_op(x)} is not {stated} but {correct}.")
                stated = correct
        if chance("second_guess"):
            question = f"Hmm, wait: is {total} {_op(x)} really {stated}?"
            if chance("flip_right" if stated == correct else "flip_wrong"):
                stated = wrong_value(correct) if stated == correct else correct
                emit(f"{question} No, it is {stated}.")
            else:
                emit(f"{question} Yes, {stated}.")
        total = stated
    if chance("reread"):
        emit(f"Let me re-read the problem: {chain.operations()}.")
        for _ in range(MAX_REREAD_REPEATS):
            if not chance("reread_again"):
                break
            emit(f"Let me re-read the problem again: {chain.operations()}.")
    if chance("summary"):
        emit(f"So the final total is {total}.")
    answer = f"Answer: {total}"
    if not style.thinking:
        return Response("\n".join(lines + [answer]))
    head = f"{THINK_OPEN}\n"
    prefix_chars = len(head) + sum(len(line) + 1 for line in lines[:prefix_lines])
    return Response(
        head + "".join(line + "\n" for line in lines) + f"{THINK_CLOSE}\n\n{answer}",
        prefix_chars if prefix_lines else 0,
    )


def switch_lines(chain: Chain) -> int:
    """Where a switching trace may switch: within the lines of a verbose response up to its steps
    (restatement, "step by step", about two lines a step)."""
    return 2 + 2 * chain.level


def reference_solution(chain: Chain) -> str:
    """The concise, slip-free solution (OPSD's privileged information)."""
    totals = chain.totals()
    steps = [f"{chain.operation(i)}: {totals[i]} {_op(x)} = {totals[i + 1]}." for i, x in enumerate(chain.operands)]
    return "\n".join(steps + [f"Answer: {chain.answer}"])


def to_problem(chain: Chain, index: int, split: str) -> Problem:
    return Problem(
        id=f"synthetic-{split}-{index}",
        question=chain.question(),
        answer=str(chain.answer),
        solution=reference_solution(chain),
        difficulty=str(chain.level),
        source="synthetic",
    )


def test_chains(seed: int = TEST_SEED, per_level: int = TEST_PER_LEVEL) -> list[Chain]:
    """The fixed held-out split: `per_level` distinct chains for each level."""
    rng = random.Random(seed)
    chains: list[Chain] = []
    for level in LEVELS:
        seen: set[Chain] = set()
        while len(seen) < per_level:
            chain = sample_chain(rng, level)
            if chain not in seen:
                seen.add(chain)
                chains.append(chain)
    return chains


def test_problems() -> list[Problem]:
    return [to_problem(c, i, "test") for i, c in enumerate(test_chains())]


def train_chains(seed: int, count: int, levels: tuple[int, ...] = LEVELS) -> list[Chain]:
    """`count` chains drawn uniformly over levels, never one from the held-out split."""
    held_out = set(test_chains())
    rng = random.Random(seed)
    chains: list[Chain] = []
    while len(chains) < count:
        chain = sample_chain(rng, rng.choice(levels))
        if chain not in held_out:
            chains.append(chain)
    return chains


def train_problems(seed: int, count: int, levels: tuple[int, ...] = LEVELS) -> list[Problem]:
    return [to_problem(c, i, f"train{seed}") for i, c in enumerate(train_chains(seed, count, levels))]


def parse_question(question: str) -> Chain:
    """Inverse of Chain.question (used to check traces)."""
    lines = question.strip().splitlines()
    start = int(lines[0].removeprefix("Start with ").rstrip("."))
    ops = [int(line.split()[1]) for line in lines[1:] if line.split()[0] in ORDINALS]
    return Chain(start, tuple(ops))


STEP_LINE = re.compile(r"^(First|Second|Third|Fourth) ([+-]\d+): (\d+) ([+-] \d+) = (\d+)\.")


def step_spans(line: str) -> tuple[int, tuple[int, int], tuple[int, int]] | None:
    """A step line's step number (from 1) and the character spans of its quoted operation ("-1":
    the lookup) and of its stated result (the arithmetic); None for any other line."""
    match = STEP_LINE.match(line)
    return (ORDINALS.index(match.group(1)) + 1, match.span(2), match.span(5)) if match else None


def audit_steps(question: str, response: str) -> dict[str, int]:
    """The step lines of a response, checked against the question, for telling failure kinds apart.

    `operands_right`: step lines that apply the question's operation for their ordinal (the lookup
    a small model learns last); `results_right`: step lines whose stated result is their own two
    numbers' sum or difference (the arithmetic; a slip counts as wrong, even when a check fixes it).
    Empty when the question is not one of this task's (a file may call its source "synthetic").
    """
    try:
        chain = parse_question(question)
    except (ValueError, IndexError):
        return {}
    audit = {"steps": 0, "operands_right": 0, "results_right": 0}
    for line in response.splitlines():
        match = STEP_LINE.match(line)
        if not match:
            continue
        ordinal, _quoted, a, x, stated = match.groups()
        index = ORDINALS.index(ordinal)
        x = int(x.replace(" ", ""))
        audit["steps"] += 1
        audit["operands_right"] += index < chain.level and x == chain.operands[index]
        audit["results_right"] += int(stated) == int(a) + x
    return audit


def expected_figures(
    style: Style,
    *,
    temperature: float,
    per_level: int = 2000,
    seed: int = 0,
    count_tokens=None,
    max_tokens: int | None = None,
) -> dict[int, dict[str, float]]:
    """Accuracy (and with `count_tokens`, mean tokens and the truncated share under `max_tokens`) per
    level of a writer that follows `style` exactly at `temperature`: the task's own figures, before any
    model's errors. A truncated response counts as wrong."""
    sharp = style.at_temperature(temperature)
    rng = random.Random(seed)
    figures = {}
    for level in LEVELS:
        right, tokens, truncated = 0, 0, 0
        for _ in range(per_level):
            chain = sample_chain(rng, level)
            text = sample_response(rng, chain, sharp).text
            length = count_tokens(text) + 1 if count_tokens else 0  # + EOS
            cut = max_tokens is not None and length > max_tokens
            right += not cut and text.endswith(f"Answer: {chain.answer}")
            tokens += min(length, max_tokens) if max_tokens else length
            truncated += cut
        figures[level] = {
            "accuracy": right / per_level,
            "mean_tokens": tokens / per_level,
            "truncation_rate": truncated / per_level,
        }
    return figures


def vocabulary_texts(seed: int = 0, traces: int = 4000) -> list[str]:
    """Texts that cover every word piece the task can produce (for building the tiny tokenizer)."""
    rng = random.Random(seed)
    texts = [" ".join(f"{i} {i:+d}" for i in range(-10, 31)), "\n".join(str(i) for i in range(31))]
    loud = dataclasses.replace(VERBOSE, slip=0.5, second_guess=0.9, reread_again=0.9)  # every wording
    for _ in range(traces):
        chain = sample_chain(rng, rng.choice(LEVELS))
        texts.append(chain.question())
        for style in (loud, CONCISE_V1, THINKING_FREE):
            texts.append(sample_response(rng, chain, style).text)
        texts.append(reference_solution(chain))
    return texts


SWITCHING_KINDS = ("v1", "v2", "reference")  # prompts whose SFT traces may start verbose and switch


def sft_prompt(builder, problem: Problem, kind: str) -> str:
    """The rendered prompt of an SFT example of `kind` (a STYLES key): exactly what the methods use.
    v1/v2 are CRISP's teacher (the instruction in front), reference is OPSD's teacher, thinking_free
    TFPI's student (the plain prompt with its thinking section closed)."""
    from crisp.prompts import resolve_instruction

    if kind in ("v1", "v2"):
        return builder.render(builder.teacher_text(problem, instruction=resolve_instruction(kind), reference=False))
    if kind == "reference":
        return builder.render(builder.teacher_text(problem, instruction=None, reference=True))
    builder = dataclasses.replace(builder, thinking_free=builder.thinking_free or kind == "thinking_free")
    return builder.render(builder.student_text(problem))


def sft_corpus(builder, chains: list[Chain], mix: dict[str, float], verbose_prefix_fraction: float, rng: random.Random):
    """(kind, rendered prompt, Response) for each chain: the prompt kind drawn with the `mix` weights."""
    kinds, weights = zip(*mix.items())
    corpus = []
    for chain in chains:
        kind = rng.choices(kinds, weights)[0]
        switching = kind in SWITCHING_KINDS and rng.random() < verbose_prefix_fraction
        switch_at = rng.randint(1, switch_lines(chain)) if switching else None
        response = sample_response(rng, chain, STYLES[kind], switch_at=switch_at)
        corpus.append((kind, sft_prompt(builder, to_problem(chain, 0, "train"), kind), response))
    return corpus


class SyntheticTask(Task):
    """The synthetic task behind crisp.data.tasks.Task's interface."""

    name = "synthetic"
    grader = "exact"

    def train_problems(self, *, seed: int, size: int, levels, limit: int | None = None) -> list[Problem]:
        problems = train_problems(seed, size, tuple(levels) or LEVELS)
        return problems[:limit] if limit else problems

    def eval_problems(self, limit: int | None = None) -> list[Problem]:
        problems = test_problems()
        return problems[:limit] if limit else problems

    def audit(self, problem: Problem, response: str) -> dict:
        return audit_steps(problem.question, response)

    def audit_summary(self, records) -> dict:
        """The share of step lines with the right operand (the lookup) and the right result (the arithmetic)."""
        steps = sum(r.get("steps", 0) for r in records)
        if not steps:
            return {}
        return {
            "operand_accuracy": sum(r.get("operands_right", 0) for r in records) / steps,
            "result_accuracy": sum(r.get("results_right", 0) for r in records) / steps,
        }

    def sft_examples(self, cfg: SFTConfig, builder: PromptBuilder) -> list[SFTExample]:
        """The base model's corpus: every prompt kind of cfg.mix answered in its style; the verbose prefix
        of a switching trace is in the response but not in the loss."""
        tokenizer = builder.tokenizer
        chains = train_chains(cfg.seed, cfg.data.size, tuple(cfg.data.levels))
        corpus = sft_corpus(
            builder, chains, cfg.mix.weights(), cfg.mix.verbose_prefix_fraction, random.Random(cfg.seed)
        )
        # One batched call to the Rust tokenizer: per-call wrapper overhead dominates here.
        encode = tokenizer.backend_tokenizer.encode_batch
        prompts = encode([prompt for _, prompt, _ in corpus], add_special_tokens=False)
        responses = encode([response.text for _, _, response in corpus], add_special_tokens=False)
        examples = []
        for prompt, encoded, (_, _, response) in zip(prompts, responses, corpus):
            mask = [int(start >= response.prefix_chars) for start, _ in encoded.offsets] + [1]  # + EOS
            examples.append(SFTExample(prompt.ids, encoded.ids + [tokenizer.eos_token_id], mask))
        return examples

    def probe(self, builder):
        """Teacher-forced argmax on the operation and result tokens of every step line of slip-free
        verbose traces of the held-out problems: the share right per step index, as probe/* metrics."""
        traces = probe_traces(builder)
        return lambda model: lookup_probe(model, traces, builder.tokenizer.pad_token_id)

    def vocabulary_texts(self, seed: int) -> list[str]:
        return vocabulary_texts(seed)


@dataclass(frozen=True)
class ProbeTrace:
    ids: list[int]  # prompt + response
    targets: list[tuple[str, int, list[int]]]  # (operand | result, step, positions that predict its tokens)


PROBE_STYLE = dataclasses.replace(VERBOSE, slip=0.0, second_guess=0.0)


def probe_traces(builder) -> list[ProbeTrace]:
    """Slip-free verbose traces of the held-out problems under plain prompts, with the positions that
    predict each step line's operation and result tokens."""
    tokenizer = builder.tokenizer
    rng = random.Random(0)
    traces = []
    for chain in test_chains():
        prompt = tokenizer(
            builder.render(builder.student_text(to_problem(chain, 0, "test"))), add_special_tokens=False
        )["input_ids"]
        text = sample_response(rng, chain, PROBE_STYLE).text
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        targets, line_start = [], 0
        for line in text.split("\n"):
            spans = step_spans(line)
            if spans is not None:
                step, *char_spans = spans
                for kind, (begin, end) in zip(("operand", "result"), char_spans):
                    begin, end = begin + line_start, end + line_start
                    inside = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if a < end and b > begin]
                    targets.append((kind, step, [len(prompt) + i - 1 for i in inside]))
            line_start += len(line) + 1
        traces.append(ProbeTrace(prompt + encoded["input_ids"], targets))
    return traces


def lookup_probe(model, traces: list[ProbeTrace], pad_id: int, batch_size: int = 50) -> dict[str, float]:
    """Teacher-forced: the share of step lines, per step index, whose operation (the lookup) or result
    (the arithmetic) tokens are all the model's argmax."""
    import torch

    from crisp.modeling import right_padded

    hits: dict[str, list[bool]] = {}
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(traces), batch_size):
            batch = traces[start : start + batch_size]
            input_ids, attention = right_padded([t.ids for t in batch], pad_id)  # (B, T)
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits  # (B, T, V)
            predicted = logits.argmax(-1).cpu()  # (B, T)
            for row, trace in enumerate(batch):
                for kind, step, positions in trace.targets:
                    right = all(predicted[row, p] == trace.ids[p + 1] for p in positions)
                    hits.setdefault(f"probe/{kind}_step{step}", []).append(right)
    return {name: sum(values) / len(values) for name, values in sorted(hits.items())}
