"""Fuzzing the grader with hypothesis: random and LaTeX-like text (up to tens of thousands of
characters, unclosed and deeply nested braces, power towers, malformed \\frac) never makes grading
raise, and every call returns within its time limit.

13,000 examples in all: 12,500 run the in-process path (extraction and the exact grader), which
must take milliseconds of CPU; 500 go through the math-verify worker, whose time limit is the
grader's timeout (the power towers that exhaust it are explicit examples: each costs a timeout and a
worker restart). derandomize=True keeps the examples the same on every run (no flaky CI); the
database is off so that no .hypothesis folder is written.
"""

from __future__ import annotations

import time

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from crisp.grading import ExactGrader, GradeResult, MathVerifyGrader, extract_boxed, final_answer, grade

FUZZ = dict(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

FRAGMENTS = [
    "\\boxed{",
    "\\boxed {",
    "\\fbox{",
    "{",
    "}",
    "\\{",
    "\\}",
    "\\frac",
    "\\frac{",
    "\\dfrac{",
    "^",
    "^{",
    "_",
    "9",
    "1",
    "0",
    "12",
    ".",
    ",",
    "-",
    "+",
    "/",
    "\\sqrt{",
    "\\sqrt[3]{",
    "\\left(",
    "\\right)",
    "(",
    ")",
    "[",
    "]",
    "\\",
    "\\\\",
    "$",
    "$$",
    "\\(",
    "\\)",
    "\\[",
    "\\]",
    "Answer:",
    "**Answer:**",
    "## Answer:",
    "\n",
    "\r\n",
    " ",
    "\t",
    "x",
    "y",
    "\\pi",
    "\\infty",
    "e",
    "i",
    "!",
    "\\cdot",
    "\\times",
    "\\text{",
    "\\mathrm{",
    "=",
    "<",
    "\\le",
    "\\begin{pmatrix}",
    "&",
    "\\end{pmatrix}",
    "%",
    "#",
    ">",
    "é",
    "∞",
    "\x00",
    "\ud800",
]

latex_like = st.lists(st.sampled_from(FRAGMENTS), max_size=80).map("".join)
# a short piece repeated up to thousands of times: the shape of a degenerate rollout
repeated = st.builds(
    lambda piece, count: piece * count,
    st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=3).map("".join),
    st.integers(1, 3000),
)
tower = st.builds(
    lambda base, height: f"{base}^{{" * height + base + "}" * height,
    st.sampled_from(["9", "10", "99", "x"]),
    st.integers(1, 8),
)
piece = st.one_of(st.text(max_size=60), latex_like, repeated, tower, st.just("9^9^9^9"))
responses = st.lists(piece, max_size=4).map("".join)
golds = st.one_of(
    st.sampled_from(["7", "-3", "0.5", "\\frac{1}{2}", "2\\sqrt{2}", "1,000", "x+1"]), st.text(max_size=12)
)

# CPU seconds (not wall time, which other processes on a busy machine stretch): linear-time
# extraction takes milliseconds here; the quadratic one it replaced took 10 s on 40,000 characters
FAST = 1.0


def _cpu_timed(function, *args, **kwargs):
    start = time.process_time()
    result = function(*args, **kwargs)
    return result, time.process_time() - start


@settings(max_examples=5000, **FUZZ)
@given(response=responses, gold=golds)
@example(response="\\boxed{" * 6000, gold="1")  # thousands of unclosed boxes
@example(response="\\boxed{" * 3000 + "}" * 3000, gold="1")  # thousands of nested ones
@example(response="1" * 20_000 + "x", gold="1")  # a long number that is not one
@example(response="Answer: " + "9" * 10_000, gold="9" * 10_000)  # more digits than int() converts
@example(response="Answer: " + "{" * 5000 + "}" * 5000, gold="1")
def test_exact_grading_never_raises_and_is_fast(response, gold):
    result, elapsed = _cpu_timed(grade, response, gold, grader=ExactGrader())
    assert isinstance(result, GradeResult)
    assert result.error is None and not result.timed_out  # the pure path has nothing to fail on
    assert elapsed < FAST, f"{elapsed:.2f} s on {len(response)} characters"
    if result.correct:
        assert result.extracted is not None


@settings(max_examples=2500, **FUZZ)
@given(prefix=responses, gold=st.sampled_from(["7", "-3", "0.5", "1,000", "12"]))
def test_a_final_answer_line_is_found_after_any_text(prefix, gold):
    """Whatever a rollout wrote before it, a last line "Answer: <gold>" makes it correct."""
    result, elapsed = _cpu_timed(grade, prefix + "\nAnswer: " + gold, gold, grader=ExactGrader())
    assert result.correct and result.path == "answer_line"
    assert elapsed < FAST


@settings(max_examples=2500, **FUZZ)
@given(text=responses)
def test_extracted_boxes_are_balanced_and_one_final_answer(text):
    boxes = extract_boxed(text)
    for box in boxes:
        assert box in text
        depth = 0
        unescaped = box.replace("\\\\", "").replace("\\{", "").replace("\\}", "")
        for char in unescaped:  # every box content is brace-balanced
            depth += {"{": 1, "}": -1}.get(char, 0)
            assert depth >= 0
        assert depth == 0
    found = final_answer(text)
    if found is not None:  # one answer per response, never empty
        path, answer = found
        assert path in ("answer_line", "boxed") and answer.strip()


@settings(max_examples=2500, **FUZZ)
@given(prefix=responses, gold=st.sampled_from(["7", "-3", "0.5", "1,000", "12"]))
def test_a_final_box_is_found_after_any_text(prefix, gold):
    """Whatever a rollout wrote before it (answer lines and boxes included), a box in a last
    sentence of its own is the final answer."""
    result, elapsed = _cpu_timed(
        grade, prefix + "\nSo the result is \\boxed{" + gold + "}.", gold, grader=ExactGrader()
    )
    assert result.correct and result.path == "boxed"
    assert elapsed < FAST


# ---------------------------------------------------------------------------------------------
# through the math-verify worker
# ---------------------------------------------------------------------------------------------

TIMEOUT = 0.5
SLACK = 1.5  # wall seconds for the round trip and for killing a worker that ran out of time

# no towers here: already 9^{9^{9}} times out every time (the examples below have those), and each
# timeout costs TIMEOUT plus a worker restart
short_latex = st.lists(st.sampled_from(FRAGMENTS + ["9^{9}", "2^{10}", "\\frac{1}{2}"]), min_size=1, max_size=12).map(
    "".join
)
wrapped = st.one_of(
    short_latex.map(lambda s: f"\\boxed{{{s}}}"),
    short_latex.map(lambda s: f"Answer: {s}"),
    st.lists(short_latex.map(lambda s: f"\\boxed{{{s}}}"), max_size=20).map(" ".join),
)


@settings(max_examples=500, **FUZZ)
@given(response=wrapped, gold=st.sampled_from(["1", "\\frac{1}{2}", "9^{9}", "2\\sqrt{2}", "x+1"]))
@example(response="\\boxed{9^{9^{9^{9^{9}}}}}", gold="1")
@example(response="Answer: 9^9^9^9", gold="1")
@example(response=" ".join("\\boxed{9^{9^{9^{" + str(n) + "}}}}" for n in range(2, 22)), gold="1")  # 20 towers, one set
@example(response="\\boxed{\\frac{1}{}" + "}" * 50, gold="1")
@example(response="Answer: \\frac{" + "{" * 900 + "1" + "}" * 900, gold="1")
def test_math_verify_grading_never_raises_and_respects_its_timeout(response, gold):
    grader = MathVerifyGrader(timeout=TIMEOUT)
    # a running worker (the pool is shared), so that its start is not in the timed call
    assert grade("Answer: 2/2", "1", grader=MathVerifyGrader(timeout=60)).correct
    start = time.monotonic()
    result = grade(response, gold, grader=grader)
    elapsed = time.monotonic() - start
    assert isinstance(result, GradeResult) and result.grader == grader.name
    assert elapsed < TIMEOUT + SLACK, f"{elapsed:.2f} s"
