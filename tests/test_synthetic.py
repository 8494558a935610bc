"""The built-in synthetic task: determinism, the arithmetic of every trace line, the held-out split,
the length gap between the two styles, verbose prefixes and the reference solution."""

from __future__ import annotations

import random
import re
import statistics

import pytest

from crisp.data import synthetic
from crisp.data.synthetic import CONCISE, FIRST_RISKY_STEP, LEVELS, TEST_PER_LEVEL, VERBOSE

STEP = re.compile(r"^(First|Second|Third|Fourth) ([+-] \d+): (-?\d+) ([+-] \d+) = (-?\d+)\.$")
CHECK_OK = re.compile(
    r"^(?:Wait, let me double-check this step: (-?\d+) ([+-] \d+) = (-?\d+)\. Yes, that is right\."
    r"|Check: (-?\d+) ([+-] \d+) = (-?\d+)\.)$"
)
CHECK_FIX = re.compile(
    r"^(?:Wait, let me double-check this step: (-?\d+) ([+-] \d+) = (-?\d+), not (-?\d+)\. So it is (-?\d+)\."
    r"|Check: (-?\d+) ([+-] \d+) = (-?\d+), not (-?\d+)\.)$"
)
RESTATE = re.compile(r"^Restate: we start at (-?\d+) and apply the operations in order\.$")
REREAD = re.compile(r"^Let me re-read the problem: (.+)\.$")
SUMMARY = re.compile(r"^So the final total is (-?\d+)\.$")
ANSWER = re.compile(r"^Answer: (-?\d+)$")


def _groups(match: re.Match) -> list[int]:
    return [int(g.replace(" ", "")) for g in match.groups() if g is not None]


def check_trace(question: str, text: str) -> dict:
    """Walk a trace line by line against the parsed question; assert every arithmetic claim.

    Returns counts of what was seen: slips, fixed slips, unchecked slips, checks.
    """
    chain = synthetic.parse_question(question)
    total = chain.start
    next_step = 1
    pending = None  # (a, x, stated) of the last step line, until the next step
    seen = {"slips": 0, "fixed": 0, "unchecked": 0, "checks": 0}
    lines = text.split("\n")
    answer = None
    for number, line in enumerate(lines):
        where = f"line {number} {line!r} of\n{text}"
        assert answer is None, f"a line after the Answer line: {where}"
        if m := STEP.match(line):
            if pending is not None and pending[2] != pending[0] + pending[1]:
                seen["unchecked"] += 1
            i = synthetic.ORDINALS.index(m.group(1)) + 1
            quoted, a, x, c = (int(g.replace(" ", "")) for g in m.groups()[1:])
            assert i == next_step, where
            assert quoted == x, f"the step quotes another operation than it applies: {where}"
            assert x == chain.operands[i - 1], f"wrong operand: {where}"
            assert a == total, f"does not continue from the running total {total}: {where}"
            if c != a + x:
                assert i >= FIRST_RISKY_STEP, f"a slip on a safe step: {where}"
                assert abs(c - (a + x)) <= 2, where
                seen["slips"] += 1
            pending = (a, x, c)
            total = c
            next_step += 1
        elif m := CHECK_OK.match(line):
            assert pending is not None, where
            a, x, c = _groups(m)
            assert (a, x) == pending[:2], where
            assert c == a + x, f"check recomputes wrongly: {where}"
            assert pending[2] == c, f"a check approves a wrong step: {where}"
            seen["checks"] += 1
        elif m := CHECK_FIX.match(line):
            assert pending is not None, where
            values = _groups(m)
            a, x, c, wrong = values[:4]
            assert (a, x) == pending[:2], where
            assert c == a + x, f"check recomputes wrongly: {where}"
            assert wrong == pending[2] != c, f"'not' names something other than the slip: {where}"
            if len(values) == 5:
                assert values[4] == c, where
            total = c  # the next step must continue from the corrected total
            pending = (a, x, c)
            seen["checks"] += 1
            seen["fixed"] += 1
        elif m := RESTATE.match(line):
            assert _groups(m) == [chain.start], where
        elif m := REREAD.match(line):
            assert m.group(1).split(", ") == [chain.operation(i) for i in range(chain.level)], where
        elif m := SUMMARY.match(line):
            assert _groups(m) == [total], where
        elif m := ANSWER.match(line):
            answer = _groups(m)[0]
            assert answer == total, where
        else:
            assert line == "Let me think step by step.", f"unknown line: {where}"
    if pending is not None and pending[2] != pending[0] + pending[1]:
        seen["unchecked"] += 1
    assert next_step == chain.level + 1, f"not every operation has a step:\n{text}"
    assert answer is not None, f"no Answer line:\n{text}"
    if seen["unchecked"] == 0:
        assert answer == chain.answer, f"every slip was checked but the answer is wrong:\n{text}"
    else:
        # an unchecked slip on the last step always changes the answer; earlier ones shift every total
        assert answer != chain.answer or seen["unchecked"] > 1
    return seen


# ---------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------


def test_train_chains_same_seed_same_chains_different_seed_different():
    a = synthetic.train_chains(seed=1, count=200)
    b = synthetic.train_chains(seed=1, count=200)
    c = synthetic.train_chains(seed=2, count=200)
    assert a == b
    assert a != c
    assert synthetic.train_problems(1, 50) == synthetic.train_problems(1, 50)


def test_sample_trace_same_seed_same_trace_different_seed_different():
    chains = synthetic.train_chains(seed=3, count=50, levels=(4,))
    traces = lambda seed: [synthetic.trace_text(synthetic.sample_trace(random.Random(seed + i), c, VERBOSE))
                           for i, c in enumerate(chains)]
    assert traces(10) == traces(10)
    assert traces(10) != traces(11)


def test_train_chains_respect_levels_and_range():
    chains = synthetic.train_chains(seed=4, count=300, levels=(2, 3))
    assert {c.level for c in chains} == {2, 3}
    for c in chains:
        assert all(0 <= t <= synthetic.MAX_TOTAL for t in c.totals())
        assert all(x != 0 and -9 <= x <= 9 for x in c.operands)


# ---------------------------------------------------------------------------------------------
# arithmetic of every trace
# ---------------------------------------------------------------------------------------------


def test_parse_question_inverts_question():
    for chain in synthetic.train_chains(seed=5, count=100):
        assert synthetic.parse_question(chain.question()) == chain


@pytest.mark.parametrize("style", [VERBOSE, CONCISE], ids=["verbose", "concise"])
def test_every_trace_line_is_arithmetically_right(style):
    rng = random.Random(0)
    totals = {"slips": 0, "fixed": 0, "unchecked": 0, "checks": 0}
    for chain in synthetic.train_chains(seed=6, count=400):
        question = synthetic.to_problem(chain, 0, "t").question
        text = synthetic.trace_text(synthetic.sample_trace(rng, chain, style, slip=0.5))
        for key, value in check_trace(question, text).items():
            totals[key] += value
    # the walk above saw every kind of event, so its assertions were exercised
    assert totals["slips"] > 0 and totals["fixed"] > 0 and totals["checks"] > totals["fixed"]
    assert totals["unchecked"] > 0  # check_risky = 0.95 < 1 leaves a few slips unchecked


def test_switching_traces_are_arithmetically_right():
    rng = random.Random(1)
    slips = {kind: 0 for kind in synthetic.SFT_KINDS}
    for chain in synthetic.train_chains(seed=7, count=300):
        for kind in synthetic.SFT_KINDS:
            lines = synthetic.sft_example(rng, chain, kind=kind, verbose_prefix=True)
            slips[kind] += check_trace(chain.question(), synthetic.trace_text(lines))["slips"]
    # a writer who can read the reference solution never slips; the others do
    assert slips["reference"] == 0 and slips["plain"] > 0 and slips["instructed"] > 0


def test_no_slips_without_slip_probability():
    rng = random.Random(2)
    for chain in synthetic.train_chains(seed=8, count=200):
        text = synthetic.trace_text(synthetic.sample_trace(rng, chain, CONCISE, slip=0.0))
        seen = check_trace(chain.question(), text)
        assert seen["slips"] == 0
        assert text.endswith(f"Answer: {chain.answer}")


def test_check_trace_catches_a_wrong_step():
    """The checker itself is not vacuous: a corrupted trace fails it."""
    chain = synthetic.Chain(5, (3, 4))
    good = "First + 3: 5 + 3 = 8.\nSecond + 4: 8 + 4 = 12.\nAnswer: 12"
    check_trace(chain.question(), good)
    for bad in ("First + 3: 5 + 3 = 9.\nSecond + 4: 9 + 4 = 13.\nAnswer: 13",  # slip on a safe step
                "First + 3: 5 + 3 = 8.\nSecond + 4: 5 + 4 = 9.\nAnswer: 9",  # not the running total
                "First + 4: 5 + 4 = 9.\nSecond + 4: 9 + 4 = 13.\nAnswer: 13",  # wrong operand
                "First + 3: 5 + 3 = 8.\nSecond + 5: 8 + 4 = 12.\nAnswer: 12",  # quotes another operation
                "First + 3: 5 + 3 = 8.\nSecond + 4: 8 + 4 = 12.\nAnswer: 11"):  # answer != total
        with pytest.raises(AssertionError):
            check_trace(chain.question(), bad)


# ---------------------------------------------------------------------------------------------
# held-out split
# ---------------------------------------------------------------------------------------------


def test_held_out_split_is_fixed_balanced_distinct():
    first = synthetic.test_chains()
    assert synthetic.test_chains() == first
    assert len(first) == TEST_PER_LEVEL * len(LEVELS)
    for level in LEVELS:
        assert sum(c.level == level for c in first) == TEST_PER_LEVEL
    assert len(set(first)) == len(first)
    problems = synthetic.test_problems()
    assert [p.question for p in problems] == [c.question() for c in first]
    assert [p.answer for p in problems] == [str(c.answer) for c in first]
    assert [p.difficulty for p in problems] == [str(c.level) for c in first]
    assert len({p.id for p in problems}) == len(problems)


@pytest.mark.parametrize("seed", [0, 1, synthetic.TEST_SEED])
def test_held_out_never_in_train(seed):
    held_out = set(synthetic.test_chains())
    train = synthetic.train_chains(seed, 3000)
    assert not held_out & set(train)
    held_questions = {p.question for p in synthetic.test_problems()}
    assert not held_questions & {p.question for p in synthetic.train_problems(seed, 500)}


# ---------------------------------------------------------------------------------------------
# styles, prefixes, reference
# ---------------------------------------------------------------------------------------------


def test_plain_style_at_least_three_times_longer_than_concise(tiny_tokenizer):
    rng = random.Random(3)
    verbose, concise = [], []

    def tokens(lines) -> int:
        return len(tiny_tokenizer(synthetic.trace_text(lines), add_special_tokens=False)["input_ids"])

    for chain in synthetic.train_chains(seed=9, count=400):
        verbose.append(tokens(synthetic.sample_trace(rng, chain, VERBOSE)))
        concise.append(tokens(synthetic.sample_trace(rng, chain, CONCISE)))
    assert statistics.fmean(verbose) >= 3 * statistics.fmean(concise)


def test_switch_at_flags_exactly_the_prefix_lines():
    chains = synthetic.train_chains(seed=10, count=100, levels=(3, 4))
    for n, chain in enumerate(chains):
        switch_at = 1 + n % 8
        lines = synthetic.sample_trace(random.Random(n), chain, CONCISE, switch_at=switch_at)
        assert [line.in_prefix for line in lines] == [i < switch_at for i in range(len(lines))]
        plain = synthetic.sample_trace(random.Random(n), chain, CONCISE)
        assert not any(line.in_prefix for line in plain)


def test_switch_at_uses_verbose_decisions_before_and_style_after():
    for n, chain in enumerate(synthetic.train_chains(seed=11, count=50)):
        never = synthetic.sample_trace(random.Random(n), chain, CONCISE, switch_at=10_000)
        verbose = synthetic.sample_trace(random.Random(n), chain, VERBOSE)
        assert synthetic.trace_text(never) == synthetic.trace_text(verbose)
        assert all(line.in_prefix for line in never)
        at_zero = synthetic.sample_trace(random.Random(n), chain, CONCISE, switch_at=0)
        concise = synthetic.sample_trace(random.Random(n), chain, CONCISE)
        assert at_zero == concise


def test_reference_solution_has_no_checks_and_the_right_answer():
    for chain in synthetic.train_chains(seed=12, count=200):
        solution = synthetic.reference_solution(chain)
        assert "Check" not in solution and "double-check" not in solution
        lines = solution.split("\n")
        assert len(lines) == chain.level + 1
        assert all(STEP.match(line) for line in lines[:-1])
        assert lines[-1] == f"Answer: {chain.answer}"
        seen = check_trace(chain.question(), solution)
        assert seen["slips"] == seen["checks"] == 0
        assert synthetic.to_problem(chain, 0, "x").solution == solution


def test_audit_steps_counts_lookup_and_arithmetic_apart():
    chain = synthetic.Chain(5, (3, -4, 6))  # totals 5 8 4 10
    question = chain.question()
    clean = synthetic.reference_solution(chain)
    assert synthetic.audit_steps(question, clean) == {"steps": 3, "operands_right": 3, "results_right": 3}
    # a slip on step 3, fixed by a check: the step line's result is still counted wrong
    slipped = clean.replace("Third + 6: 4 + 6 = 10.", "Third + 6: 4 + 6 = 11.\nCheck: 4 + 6 = 10, not 11.")
    assert synthetic.audit_steps(question, slipped) == {"steps": 3, "operands_right": 3, "results_right": 2}
    # the operand of another line, computed right: lookup wrong, arithmetic right
    misread = clean.replace("Second - 4: 8 - 4 = 4.", "Second + 3: 8 + 3 = 11.")
    assert synthetic.audit_steps(question, misread) == {"steps": 3, "operands_right": 2, "results_right": 3}
    # a step the question does not have counts as a wrong operand; non-step lines are ignored
    extra = clean.replace("Answer: 10", "Fourth + 1: 10 + 1 = 11.\nSo the final total is 11.\nAnswer: 11")
    assert synthetic.audit_steps(question, extra) == {"steps": 4, "operands_right": 3, "results_right": 4}
    assert synthetic.audit_steps(question, "Answer: 10") == {"steps": 0, "operands_right": 0, "results_right": 0}
    assert synthetic.audit_steps("What is 2 + 2?", clean) == {}  # not this task's question


def test_audit_steps_on_sampled_traces_sees_exactly_the_slips():
    rng = random.Random(5)
    for _ in range(200):
        chain = synthetic.sample_chain(rng, rng.choice(LEVELS))
        text = synthetic.trace_text(synthetic.sample_trace(rng, chain, VERBOSE, slip=0.5))
        audit = synthetic.audit_steps(chain.question(), text)
        assert audit["steps"] == audit["operands_right"] == chain.level
        assert chain.level - audit["results_right"] == check_trace(chain.question(), text)["slips"]
