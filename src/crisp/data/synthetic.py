"""The built-in synthetic reasoning task: running-total arithmetic chains.

A problem starts from a number and applies 1-4 additions/subtractions of 1-9 (one per line, numbered
"Second - 3"), the running total staying in 0..20; its difficulty is the number of operations.
Each step line starts by quoting its operation ("Second - 3: 9 - 3 = 6."), so a small model finds the
operand by matching the ordinal word, the simplest kind of copying a 2-layer transformer learns. Traces imitate a reasoning model:
each redundant line (a restatement, a check after a step, a re-read, a summary) is an independent
random choice whose probability depends on the style. Without the concise instruction the model
writes them almost always; with it, almost never -- except the checks after "risky" steps, which
are the ones that carry weight.

Risky steps are the steps from the third on: there the writer slips (states a wrong result) with
probability `slip`, and only a check catches and fixes the slip. A method that cuts every check
therefore loses accuracy on long chains; one that keeps the useful checks does not.

The instructed training examples sometimes start in the verbose style and switch to the concise one
at a line boundary (the verbose prefix is excluded from the loss), so that the instructed model has
seen every kind of prefix and its next-line distribution is meaningful wherever the student is.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from crisp.data.problems import Problem

LEVELS = (1, 2, 3, 4)
ORDINALS = ("First", "Second", "Third", "Fourth")
MAX_TOTAL = 20
FIRST_RISKY_STEP = 3
TEST_SEED = 20_240_601
TEST_PER_LEVEL = 50


@dataclass(frozen=True)
class Style:
    """Probabilities of each redundant line."""

    restate: float
    think: float
    check_safe: float
    check_risky: float
    reread: float
    summary: float
    long_check: float  # wording of a check: the long "Wait, let me double-check..." or "Check: ..."


VERBOSE = Style(
    restate=0.9, think=0.9, check_safe=0.9, check_risky=0.95, reread=0.9, summary=0.9, long_check=0.95
)
CONCISE = Style(
    restate=0.03, think=0.03, check_safe=0.05, check_risky=0.95, reread=0.03, summary=0.05, long_check=0.05
)
SLIP = 0.3


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
        """The operation as the question words it, e.g. "Third - 1" (index counts from 0)."""
        return f"{ORDINALS[index]} {_op(self.operands[index])}"

    def question(self) -> str:
        ops = "".join(self.operation(i) + "\n" for i in range(self.level))
        return f"Start with {self.start}.\n{ops}What is the result?"


@dataclass(frozen=True)
class TraceLine:
    text: str
    in_prefix: bool  # written in the verbose style before an instructed trace switches


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


def _slipped(rng: random.Random, correct: int) -> int:
    wrong = [v for v in (correct - 2, correct - 1, correct + 1, correct + 2) if 0 <= v <= MAX_TOTAL]
    return rng.choice(wrong)


def sample_trace(
    rng: random.Random, chain: Chain, style: Style, *, switch_at: int | None = None, slip: float = SLIP
) -> list[TraceLine]:
    """One reasoning trace. Decisions before line `switch_at` use VERBOSE, later ones `style`."""
    lines: list[TraceLine] = []

    def current() -> Style:
        return VERBOSE if switch_at is not None and len(lines) < switch_at else style

    def emit(text: str) -> None:
        lines.append(TraceLine(text, in_prefix=switch_at is not None and len(lines) < switch_at))

    if rng.random() < current().restate:
        emit(f"Restate: we start at {chain.start} and apply the operations in order.")
    if rng.random() < current().think:
        emit("Let me think step by step.")
    total = chain.start
    for i, x in enumerate(chain.operands, start=1):
        correct = total + x
        risky = i >= FIRST_RISKY_STEP
        stated = _slipped(rng, correct) if risky and rng.random() < slip else correct
        emit(f"{chain.operation(i - 1)}: {total} {_op(x)} = {stated}.")
        check = current().check_risky if risky else current().check_safe
        if rng.random() < check:
            long = rng.random() < current().long_check
            recomputed = f"{total} {_op(x)} = {correct}"
            if stated == correct:
                emit(f"Wait, let me double-check this step: {recomputed}. Yes, that is right." if long
                     else f"Check: {recomputed}.")
            else:
                emit(f"Wait, let me double-check this step: {recomputed}, not {stated}. So it is {correct}."
                     if long else f"Check: {recomputed}, not {stated}.")
                stated = correct
        total = stated
    if rng.random() < current().reread:
        emit(f"Let me re-read the problem: {', '.join(chain.operation(i) for i in range(chain.level))}.")
    if rng.random() < current().summary:
        emit(f"So the final total is {total}.")
    emit(f"Answer: {total}")
    return lines


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
    ops = [int(line.split()[1] + line.split()[2]) for line in lines[1:] if line.split()[0] in ORDINALS]
    return Chain(start, tuple(ops))


STEP_LINE = re.compile(r"^(First|Second|Third|Fourth) ([+-] \d+): (\d+) ([+-] \d+) = (\d+)\.")


def step_spans(line: str) -> tuple[int, tuple[int, int], tuple[int, int]] | None:
    """A step line's step number (from 1) and the character spans of its quoted operation ("- 1":
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


def trace_text(lines: list[TraceLine]) -> str:
    return "\n".join(line.text for line in lines)


SFT_KINDS = ("plain", "instructed", "reference")


def sft_example(rng: random.Random, chain: Chain, *, kind: str, verbose_prefix: bool) -> list[TraceLine]:
    """One SFT trace for a prompt of the given kind.

    plain: verbose. instructed (the concise instruction in the prompt): concise. reference (OPSD's
    privileged solution in the prompt): concise and slip-free, since the writer can read every total.
    Instructed and reference traces sometimes start verbose and switch, so those prompts have seen
    verbose prefixes too.
    """
    if kind not in SFT_KINDS:
        raise ValueError(f"unknown SFT example kind {kind!r}; expected one of {SFT_KINDS}")
    if kind == "plain":
        return sample_trace(rng, chain, VERBOSE)
    switch_at = rng.randint(1, 2 * chain.level + 3) if verbose_prefix else None
    slip = 0.0 if kind == "reference" else SLIP
    return sample_trace(rng, chain, CONCISE, switch_at=switch_at, slip=slip)


def vocabulary_texts(seed: int = 0, traces: int = 4000) -> list[str]:
    """Texts that cover every word piece the task can produce (for building the tiny tokenizer)."""
    rng = random.Random(seed)
    texts = [" ".join(f"{i} {i:+d}" for i in range(-10, 31)), "\n".join(str(i) for i in range(31))]
    for _ in range(traces):
        chain = sample_chain(rng, rng.choice(LEVELS))
        texts.append(chain.question())
        for style in (VERBOSE, CONCISE):
            texts.append(trace_text(sample_trace(rng, chain, style, slip=0.5)))
        texts.append(reference_solution(chain))
    return texts
