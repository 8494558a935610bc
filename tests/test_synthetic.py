"""The built-in synthetic task: every line of every response is consistent with the question, the
decisions that make verbosity help and hurt, switching traces, the held-out split, the step audit,
and the figures the generating process implies (which the README's analysis relies on)."""

from __future__ import annotations

import dataclasses
import random
import re

import pytest

from crisp.data import synthetic
from crisp.data.synthetic import (
    CONCISE_V1,
    CONCISE_V2,
    FIRST_RISKY_STEP,
    IDEAL,
    LEVELS,
    REFERENCE,
    STYLES,
    TEST_PER_LEVEL,
    THINKING_FREE,
    VERBOSE,
)

STEP = re.compile(r"^(First|Second|Third|Fourth) ([+-]\d+): (\d+) ([+-] \d+) = (\d+)\.$")
CHECK_OK = re.compile(r"^Check: (\d+) ([+-] \d+) = (\d+)\.$")
CHECK_FIX = re.compile(r"^Check: (\d+) ([+-] \d+) is not (\d+) but (\d+)\.$")
GUESS = re.compile(r"^Hmm, wait: is (\d+) ([+-] \d+) really (\d+)\? (?:Yes, (\d+)|No, it is (\d+))\.$")
RESTATE = re.compile(r"^Restate: we start at (\d+) and apply the operations in order\.$")
REREAD = re.compile(r"^Let me re-read the problem( again)?: (.+)\.$")
SUMMARY = re.compile(r"^So the final total is (\d+)\.$")
ANSWER = re.compile(r"^Answer: (\d+)$")


def _ints(*groups) -> list[int]:
    return [int(g.replace(" ", "")) for g in groups if g is not None]


def walk(question: str, text: str) -> dict:
    """Walk a response line by line against the parsed question, asserting every claim it makes.

    Returns what was seen: slips, checks (and the slips they fixed), second-guesses and the flips
    they made (right -> wrong, wrong -> right), re-reads, and whether the answer is the chain's."""
    chain = synthetic.parse_question(question)
    thinking = text.startswith("<think>\n")
    if thinking:
        head, _, tail = text.partition("\n</think>\n\n")
        assert tail and head.startswith("<think>\n"), f"no closed thinking section:\n{text}"
        lines, answer_lines = head.removeprefix("<think>\n").split("\n"), tail.split("\n")
    else:
        assert "<think>" not in text and "</think>" not in text, text
        *lines, last = text.split("\n")
        answer_lines = [last]
    assert len(answer_lines) == 1 and ANSWER.match(answer_lines[0]), f"the answer section is one Answer line:\n{text}"
    seen = dict(slips=0, checks=0, fixed=0, guesses=0, to_wrong=0, to_right=0, rereads=0)
    total, step, pending = chain.start, 0, None  # pending: (a, x) of the last step line
    for line in (line for line in lines if line):
        where = f"{line!r} in\n{text}"
        if m := STEP.match(line):
            step += 1
            quoted, a, x, stated = _ints(*m.groups()[1:])
            assert synthetic.ORDINALS.index(m.group(1)) + 1 == step, where
            assert quoted == x == chain.operands[step - 1], f"wrong operand: {where}"
            assert a == total, f"does not continue from the running total {total}: {where}"
            if stated != a + x:
                assert step >= FIRST_RISKY_STEP and stated == synthetic.wrong_value(a + x), f"bad slip: {where}"
                seen["slips"] += 1
            pending, total = (a, x), stated
        elif m := CHECK_OK.match(line):
            a, x, c = _ints(*m.groups())
            assert (a, x) == pending and c == a + x == total, f"a check approves something wrong: {where}"
            seen["checks"] += 1
        elif m := CHECK_FIX.match(line):
            a, x, wrong, c = _ints(*m.groups())
            assert (a, x) == pending and wrong == total != c == a + x, where
            total = c
            seen["checks"] += 1
            seen["fixed"] += 1
        elif m := GUESS.match(line):
            a, x, doubted, *said = _ints(*m.groups())
            assert (a, x) == pending and doubted == total, where
            seen["guesses"] += 1
            if m.group(4) is not None:
                assert said == [total], where
            else:
                right = a + x
                assert said[0] == (synthetic.wrong_value(right) if total == right else right), where
                seen["to_wrong" if total == right else "to_right"] += 1
                total = said[0]
        elif m := RESTATE.match(line):
            assert _ints(m.group(1)) == [chain.start], where
        elif m := REREAD.match(line):
            assert m.group(2) == chain.operations(), where
            assert bool(m.group(1)) == (seen["rereads"] > 0), f"'again' only on a repeat: {where}"
            seen["rereads"] += 1
        elif m := SUMMARY.match(line):
            assert _ints(m.group(1)) == [total], where
        else:
            assert line == "Let me think step by step.", f"unknown line: {where}"
    assert step == chain.level, f"not every operation has a step:\n{text}"
    answer = _ints(ANSWER.match(answer_lines[0]).group(1))[0]
    assert answer == total, f"the answer is not the running total:\n{text}"
    seen["right"] = answer == chain.answer
    seen["thinking"] = thinking
    return seen


def sampled(style, count=400, seed=0, levels=LEVELS, **kwargs):
    rng = random.Random(seed)
    for chain in synthetic.train_chains(seed, count, levels):
        yield chain, synthetic.sample_response(rng, chain, style, **kwargs)


@pytest.mark.parametrize("kind", list(STYLES))
def test_every_line_of_every_style_is_consistent_with_the_question(kind):
    style = dataclasses.replace(STYLES[kind], second_guess=max(STYLES[kind].second_guess, 0.3))  # see flips
    totals = dict(slips=0, fixed=0, to_wrong=0, to_right=0)
    for chain, response in sampled(style, count=500):
        seen = walk(chain.question(), response.text)
        assert seen["thinking"] == style.thinking
        assert seen["rereads"] <= 1 + synthetic.MAX_REREAD_REPEATS
        for key in totals:
            totals[key] += seen[key]
    if style.slip:
        assert totals["slips"] and totals["to_wrong"], totals
    if kind == "plain":  # wrong totals survive the checks often enough for a second-guess to fix one
        assert totals["to_right"] and totals["fixed"], totals


def test_same_seed_same_responses_other_seed_other_responses():
    texts = lambda seed: [r.text for _, r in sampled(VERBOSE, count=50, seed=seed)]  # noqa: E731
    assert texts(1) == texts(1) and texts(1) != texts(2)


def test_checks_fix_exactly_the_slips_they_see_and_unchecked_slips_cost_the_answer():
    no_guess = dataclasses.replace(VERBOSE, second_guess=0.0)
    for chain, response in sampled(no_guess, count=300, levels=(3, 4)):
        seen = walk(chain.question(), response.text)
        assert seen["right"] == (seen["slips"] == seen["fixed"])


def test_v1_drops_the_check_a_four_step_chain_needs_and_v2_keeps_it():
    # over-compression: v1 checks its last step only, so step 3 of 4 goes unchecked
    assert CONCISE_V1.check(3, 4) <= 0.03 and CONCISE_V1.check(4, 4) >= 0.97 and CONCISE_V1.check(3, 3) >= 0.97
    assert CONCISE_V2.check(3, 4) >= 0.97 and CONCISE_V2.check(4, 4) >= 0.97
    assert CONCISE_V2.check(1, 2) <= 0.03 and CONCISE_V2.check(1, 1) >= 0.97  # a brief check of the answer
    assert IDEAL.check(1, 1) == 0 and IDEAL.check(3, 4) == 1
    assert REFERENCE.check(3, 4) == 0 and REFERENCE.slip == 0
    for style in (CONCISE_V1, CONCISE_V2):  # every instructed decision near-deterministic
        numbers = [
            getattr(style, f.name)
            for f in dataclasses.fields(style)
            if f.name not in ("thinking", "slip", "flip_right", "flip_wrong")
        ]
        assert all(p <= 0.05 or p >= 0.97 for p in numbers), style


def test_at_temperature_sharpens_every_decision():
    sharp = VERBOSE.at_temperature(0.6)
    p = 0.3 ** (1 / 0.6) / (0.3 ** (1 / 0.6) + 0.7 ** (1 / 0.6))
    assert sharp.slip == pytest.approx(p) and p == pytest.approx(0.1959, abs=1e-4)
    assert sharp.second_guess == pytest.approx(0.5) and sharp.reread_again == pytest.approx(0.5)
    assert sharp.restate > VERBOSE.restate and sharp.thinking is True
    assert VERBOSE.at_temperature(1.0) == VERBOSE


@pytest.fixture(scope="module")
def process(tiny_tokenizer):
    """Accuracy, tokens and truncation per level of each style's generating process at the
    evaluation temperature, under the evaluation's 256-token cap."""
    count = lambda text: len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    styles = {"base": VERBOSE, "v1": CONCISE_V1, "v2": CONCISE_V2, "ideal": IDEAL, "thinking_free": THINKING_FREE}
    return {
        name: synthetic.expected_figures(style, temperature=0.6, per_level=600, count_tokens=count, max_tokens=256)
        for name, style in styles.items()
    }


def mean(figures, key):
    return sum(f[key] for f in figures.values()) / len(figures)


def test_the_process_lets_shorter_be_more_accurate_and_tells_the_instructions_apart(process):
    base, v1, v2, ideal, free = (process[k] for k in ("base", "v1", "v2", "ideal", "thinking_free"))
    # verbosity hurts: base accuracy falls with length, second-guesses cost even one-step chains,
    # and re-read loops run long chains into the cap
    assert [base[lv]["accuracy"] for lv in LEVELS] == sorted((base[lv]["accuracy"] for lv in LEVELS), reverse=True)
    assert base[1]["accuracy"] < 0.99 and base[4]["accuracy"] < 0.85
    assert base[4]["truncation_rate"] > 0.03 and base[1]["truncation_rate"] == 0
    # prompting v1 is shorter and more accurate, but over-compresses level 4; v2 does not
    assert mean(v1, "accuracy") > mean(base, "accuracy") + 0.02 and mean(v1, "mean_tokens") < 0.4 * mean(
        base, "mean_tokens"
    )
    assert v2[4]["accuracy"] > v1[4]["accuracy"] + 0.1
    assert all(v1[lv]["accuracy"] > 0.98 for lv in (1, 2, 3))
    # the ideal (checks on the risky steps only) is as accurate as v2 and shorter on short chains
    assert mean(ideal, "accuracy") >= mean(v2, "accuracy") - 0.01 and ideal[1]["mean_tokens"] < v2[1]["mean_tokens"]
    # thinking-free answers are short and worse than thinking on long chains
    assert free[4]["accuracy"] < base[4]["accuracy"] and mean(free, "mean_tokens") < mean(v1, "mean_tokens")


def test_switch_at_marks_a_verbose_prefix_of_whole_lines():
    for n, (chain, _) in enumerate(sampled(CONCISE_V1, count=60, levels=(3, 4))):
        switch_at = 1 + n % 8
        switched = synthetic.sample_response(random.Random(n), chain, CONCISE_V1, switch_at=switch_at)
        prefix = switched.text[: switched.prefix_chars]
        assert prefix.startswith("<think>\n") and prefix.endswith("\n")
        assert prefix.count("\n") == min(switch_at, switched.text.count("\n") - 3) + 1  # tags: <think>, </think>, blank
        walk(chain.question(), switched.text)
        assert synthetic.sample_response(random.Random(n), chain, CONCISE_V1).prefix_chars == 0


def test_switch_at_uses_verbose_decisions_before_and_the_style_after():
    for n, (chain, _) in enumerate(sampled(CONCISE_V1, count=50)):
        never = synthetic.sample_response(random.Random(n), chain, CONCISE_V1, switch_at=10_000)
        assert never.text == synthetic.sample_response(random.Random(n), chain, VERBOSE).text
        at_zero = synthetic.sample_response(random.Random(n), chain, CONCISE_V1, switch_at=0)
        assert at_zero.text == synthetic.sample_response(random.Random(n), chain, CONCISE_V1).text
    # a reference reader never slips, even in its verbose prefix
    for n, (chain, _) in enumerate(sampled(REFERENCE, count=200, levels=(4,))):
        switched = synthetic.sample_response(random.Random(n), chain, REFERENCE, switch_at=6)
        assert walk(chain.question(), switched.text)["slips"] == 0


def test_reference_solution_is_slip_free_and_right():
    for chain in synthetic.train_chains(seed=12, count=200):
        solution = synthetic.reference_solution(chain)
        assert "Check" not in solution and len(solution.split("\n")) == chain.level + 1
        seen = walk(chain.question(), solution)
        assert seen["right"] and seen["slips"] == seen["checks"] == 0
        assert synthetic.to_problem(chain, 0, "x").solution == solution


def test_held_out_split_is_fixed_balanced_distinct():
    first = synthetic.test_chains()
    assert synthetic.test_chains() == first
    assert len(first) == TEST_PER_LEVEL * len(LEVELS) and len(set(first)) == len(first)
    for level in LEVELS:
        assert sum(c.level == level for c in first) == TEST_PER_LEVEL
    problems = synthetic.SyntheticTask().eval_problems()
    assert [p.question for p in problems] == [c.question() for c in first]
    assert [p.answer for p in problems] == [str(c.answer) for c in first]
    assert [p.difficulty for p in problems] == [str(c.level) for c in first]


@pytest.mark.parametrize("seed", [0, 1, synthetic.TEST_SEED])
def test_held_out_never_in_train(seed):
    held_out = set(synthetic.test_chains())
    assert not held_out & set(synthetic.train_chains(seed, 3000))
    train = synthetic.SyntheticTask().train_problems(seed=seed, size=500, levels=[1, 2, 3, 4])
    assert not {p.question for p in synthetic.test_problems()} & {p.question for p in train}


def test_train_chains_respect_levels_and_range():
    chains = synthetic.train_chains(seed=4, count=300, levels=(2, 3))
    assert {c.level for c in chains} == {2, 3}
    assert all(0 <= t <= synthetic.MAX_TOTAL for c in chains for t in c.totals())
    assert all(synthetic.parse_question(c.question()) == c for c in chains)


def test_audit_steps_counts_lookup_and_arithmetic_apart():
    chain = synthetic.Chain(5, (3, -4, 6))  # totals 5 8 4 10
    question = chain.question()
    clean = synthetic.reference_solution(chain)
    assert synthetic.audit_steps(question, clean) == {"steps": 3, "operands_right": 3, "results_right": 3}
    # a slip on step 3, fixed by a check: the step line's result is still counted wrong
    slipped = clean.replace("Third +6: 4 + 6 = 10.", "Third +6: 4 + 6 = 11.\nCheck: 4 + 6 is not 11 but 10.")
    assert synthetic.audit_steps(question, slipped) == {"steps": 3, "operands_right": 3, "results_right": 2}
    # the operand of another line, computed right: lookup wrong, arithmetic right
    misread = clean.replace("Second -4: 8 - 4 = 4.", "Second +3: 8 + 3 = 11.")
    assert synthetic.audit_steps(question, misread) == {"steps": 3, "operands_right": 2, "results_right": 3}
    extra = clean.replace("Answer: 10", "Fourth +1: 10 + 1 = 11.\nAnswer: 11")
    assert synthetic.audit_steps(question, extra) == {"steps": 4, "operands_right": 3, "results_right": 4}
    assert synthetic.audit_steps("What is 2 + 2?", clean) == {}  # not this task's question


def test_audit_summary_shares_over_the_step_lines():
    task = synthetic.SyntheticTask()
    records = [
        {"steps": 2, "operands_right": 2, "results_right": 1},
        {"steps": 3, "operands_right": 1, "results_right": 3},
    ]
    assert task.audit_summary(records) == {
        "operand_accuracy": pytest.approx(3 / 5),
        "result_accuracy": pytest.approx(4 / 5),
    }
    assert task.audit_summary([{}]) == {}
    problem = synthetic.to_problem(synthetic.Chain(5, (3,)), 0, "t")
    assert task.audit(problem, "<think>\nFirst +3: 5 + 3 = 9.\n</think>\n\nAnswer: 9") == {
        "steps": 1,
        "operands_right": 1,
        "results_right": 0,
    }


def test_audit_on_sampled_responses_sees_exactly_the_slips():
    for chain, response in sampled(dataclasses.replace(VERBOSE, slip=0.5), count=200):
        audit = synthetic.audit_steps(chain.question(), response.text)
        assert audit["steps"] == audit["operands_right"] == chain.level
        assert chain.level - audit["results_right"] == walk(chain.question(), response.text)["slips"]
