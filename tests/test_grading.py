"""Answer extraction (the final answer only), math-verify grading with hard timeouts, and the
exact grader."""

from __future__ import annotations

import importlib.metadata
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from crisp.grading import (
    GRADER_VERSION,
    ExactGrader,
    GradeResult,
    MathVerifyGrader,
    extract_answer_line,
    extract_boxed,
    final_answer,
    get_grader,
    grade,
)

MV_NAME = f"math-verify=={importlib.metadata.version('math-verify')}/final-answer-v{GRADER_VERSION}"

# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Some work.\nAnswer: 42", "42"),
        ("Answer: 42.", "42"),
        ("   Answer:   7  ", "7"),
        ("**Answer:** 42", "42"),
        ("**Answer**: 42", "42"),
        ("**Answer: 42**", "42"),
        ("Answer: $\\frac{1}{2}$", "\\frac{1}{2}"),
        ("Answer: $\\frac{1}{2}$.", "\\frac{1}{2}"),
        ("Answer: \\(x+1\\)", "x+1"),
        ("Answer: $\\boxed{12}$", "12"),
        ("Answer: 3\nmore thoughts\nAnswer: 4\ndone", "4"),
        ("Answer: $5$ and $6$", "$5$ and $6$"),  # two math spans are not one wrapped value
        # as people write it: any case, "Final Answer", trailing punctuation
        ("answer: 42", "42"),
        ("ANSWER: 42", "42"),
        ("Final Answer: 42", "42"),
        ("final answer: 42;", "42"),
        ("**Final Answer:** $42$,", "42"),
        ("**Final Answer**: 42:", "42"),
        ("Thus, the final answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
        ("The final answer is: 7", "7"),
        # the Minerva format lighteval and Math-Verify's tests use
        ("Final Answer: The final answer is $28 \\%$. I hope it is correct.", "28 \\%"),
        ("Answer: $\\boxed{-2}$ and $\\boxed{1}$", "-2, 1"),
    ],
)
def test_extract_answer_line(text: str, expected: str) -> None:
    assert extract_answer_line(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "no answer here",
        "The Answer: is not at line start",
        "Answer:",
        "Answer:   $$",
        "Answer:  .",
        "The final answer is 5, or so I thought.\nLet me check again.",  # not on the last line
    ],
)
def test_extract_answer_line_none(text: str) -> None:
    assert extract_answer_line(text) is None


def test_extract_boxed_nested_multiple_and_fbox() -> None:
    text = "first \\boxed{\\frac{1}{2}} then \\fbox{3} and \\boxed {x^{2^{3}}}"
    assert extract_boxed(text) == ["\\frac{1}{2}", "3", "x^{2^{3}}"]


def test_extract_boxed_escaped_braces_and_nested_box() -> None:
    assert extract_boxed("\\boxed{\\{1,2\\}}") == ["\\{1,2\\}"]
    assert extract_boxed("\\boxed{\\boxed{5}}") == ["\\boxed{5}", "5"]


def test_extract_boxed_unclosed_is_ignored() -> None:
    assert extract_boxed("ok \\boxed{1} then truncated \\boxed{\\frac{1}{2") == ["1"]
    assert extract_boxed("\\boxedx{1} \\boxed") == []


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("I think \\boxed{3}. Wait, no: \\boxed{5}", ("boxed", "5")),  # the revision counts
        ("\\boxed{12}\nWait, maybe not.\nAnswer: 13", ("answer_line", "13")),
        ("Answer: 13\nHmm, that is wrong; it is $\\boxed{12}$.", ("boxed", "12")),
        ("Answer: $\\boxed{12}$", ("answer_line", "12")),  # a box inside the answer line is that line
        ("Answer: 3\nLet me re-check.\nSo the final answer is $7$.", ("answer_line", "7")),
        # boxes that end the response together are one set answer
        ("so $x = \\boxed{-2}$ and $x = $... no: $\\boxed{-2}$ and $\\boxed{1}$.", ("boxed", "-2, 1")),
        ("\\boxed{3} \\boxed{5} \\boxed{7} \\boxed{12}", ("boxed", "3, 5, 7, 12")),
        ("\\(\\boxed{1}\\), \\(\\boxed{2}\\) or \\(\\boxed{3}\\)", ("boxed", "1, 2, 3")),
        ("x = \\boxed{2} \\quad \\text{or} \\quad x = \\boxed{3}", ("boxed", "3")),  # "x =" is not a separator
        ("The answer is \\boxed{5}.\n\n**Final Answer**\n\\[\\boxed{5}\\]", ("boxed", "5")),  # no colon: a heading
        ("\\boxed{5} $\\boxed{5}$", ("boxed", "5")),  # the same answer twice is that answer
        ("\\boxed{\\boxed{ 5 }}", ("boxed", "5")),
        ("**Final Answer:**\n\\boxed{5}", ("boxed", "5")),  # an empty answer line gives way to the box
        ("no answer, and a truncated \\boxed{\\frac{1}{2", None),
        ("\\boxed{ }", None),
    ],
)
def test_final_answer_is_the_last_answer_the_response_gives(response: str, expected) -> None:
    assert final_answer(response) == expected


def test_degenerate_nests_of_boxes_unwrap_without_recursion() -> None:
    assert final_answer("\\boxed{" * 5000 + "7" + "}" * 5000) == ("boxed", "7")


# ---------------------------------------------------------------------------------------------
# math-verify grading
# ---------------------------------------------------------------------------------------------


# (candidate, gold, credited by math-verify, credited by the exact grader)
EQUIVALENCES = [
    ("0.5", "\\frac{1}{2}", True, False),
    ("1/2", "\\frac{1}{2}", True, False),
    ("\\dfrac{1}{2}", "\\frac12", True, False),
    ("\\sqrt{8}", "2\\sqrt{2}", True, False),
    ("\\{2,1\\}", "\\{1,2\\}", True, False),
    ("(1,2]", "[1,2)", False, False),
    ("\\text{B}", "\\text{(B)}", True, False),
    ("1,000", "1000", True, True),
    ("x=3", "3", True, False),  # math-verify compares the right-hand side of a simple assignment
    ("10", "10\\%", True, False),  # math-verify is lenient about a percent sign either way
    ("0.333", "\\frac{1}{3}", False, False),  # rounded to 6 places before comparing
    ("0.3333333", "\\frac{1}{3}", True, False),
    ("3", "2", False, False),
    ("x", "\\frac{1}{2}", False, False),
    ("07", "7", True, True),
    ("+7", "7", True, True),
    ("7.", "7", True, True),
    ("7.0", "7", True, True),
    (" 7 ", "7", True, True),
    ("-0", "0", True, True),
    ("2.50", "2.5", True, True),
    ("x + 1", "x+1", True, True),
    ("8", "7", False, False),
    ("-7", "7", False, False),
    ("1/2", "0.5", True, False),  # exact means exact: no arithmetic
]


@pytest.mark.parametrize(("candidate", "gold", "math_verify", "exact"), EQUIVALENCES)
def test_math_verify_equivalences(candidate: str, gold: str, math_verify: bool, exact: bool) -> None:
    result = grade(f"Work.\nAnswer: {candidate}", gold)
    assert result.correct is math_verify, result
    assert result.extracted == candidate.strip().removesuffix(".")  # the answer line's value
    assert result.path == "answer_line"
    assert result.grader == MV_NAME
    assert not result.timed_out and result.error is None


def test_no_answer_at_all() -> None:
    result = grade("I am not sure how to solve this.", "5")
    assert result == GradeResult(False, None, None, MV_NAME, False, None)


def test_truncated_box_is_not_an_answer() -> None:
    result = grade("so the answer is \\boxed{\\frac{1}{2", "\\frac{1}{2}")
    assert not result.correct
    assert result.extracted is None


def test_answer_line_only() -> None:
    result = grade("We get 6.\nAnswer: 6", "6")
    assert (result.correct, result.path, result.extracted) == (True, "answer_line", "6")


def test_boxed_only() -> None:
    result = grade("Thus $x = \\boxed{\\frac{3}{4}}$ and we are done.", "0.75")
    assert (result.correct, result.path, result.extracted) == (True, "boxed", "\\frac{3}{4}")


def test_an_earlier_answer_that_a_later_one_revises_is_not_credited() -> None:
    result = grade("So \\boxed{12}.\nWait, maybe not.\nAnswer: 13", "12")
    assert (result.correct, result.path, result.extracted) == (False, "answer_line", "13")
    assert not grade("I think \\boxed{3}. Wait, no: \\boxed{5}", "3").correct
    assert grade("I think \\boxed{3}. Wait, no: \\boxed{5}", "5").correct
    assert not grade("Answer: 3\nNo: the answer is \\boxed{5}.", "3", grader=ExactGrader()).correct


@pytest.mark.parametrize("grader", [ExactGrader(), MathVerifyGrader()], ids=["exact", "math-verify"])
def test_boxing_every_guess_earns_nothing(grader) -> None:
    guesses = [3, 5, 7, 12]
    for response in (
        " ".join(f"\\boxed{{{g}}}" for g in guesses),
        "\n".join(f"Maybe \\boxed{{{g}}}" for g in guesses) + "\n" + " or ".join(f"$\\boxed{{{g}}}$" for g in guesses),
        "Answer: " + " or ".join(map(str, guesses)),
    ):
        for gold in guesses:
            result = grade(response, str(gold), grader=grader)
            assert not result.correct, (response, gold, result)
    # control: the same boxes as one honest answer are right
    assert grade("\\boxed{12}", "12", grader=grader).correct


def test_a_set_answer_of_several_boxes_verifies_as_a_set() -> None:
    assert grade("The roots are $\\boxed{-2}$ and $\\boxed{1}$.", "1, -2").correct
    assert grade("The roots are $\\boxed{-2}$ and $\\boxed{1}$.", "\\{-2, 1\\}").correct
    assert not grade("The roots are $\\boxed{-2}$ and $\\boxed{1}$.", "1").correct


@pytest.mark.parametrize("grader", [ExactGrader(), MathVerifyGrader()], ids=["exact", "math-verify"])
def test_digits_apart_are_not_one_number(grader) -> None:
    assert not grade("\\boxed{2 3}", "23", grader=grader).correct
    assert not grade("Answer: 1 2", "12", grader=grader).correct
    assert grade("\\boxed{ 23 }", "23", grader=grader).correct  # spaces around the number are nothing


def test_both_paths_wrong_reports_answer_line() -> None:
    result = grade("\\boxed{1} ... \\boxed{2}\nAnswer: 3", "4")
    assert (result.correct, result.path, result.extracted) == (False, "answer_line", "3")
    result = grade("\\boxed{1} ... \\boxed{2}", "4")
    assert (result.correct, result.path, result.extracted) == (False, "boxed", "2")  # the last box


def test_last_answer_line_wins() -> None:
    text = "Answer: 3\nHmm, let me re-check.\nAnswer: 4"
    assert not grade(text, "3").correct
    assert grade(text, "4").correct


def test_fast_path_does_not_call_math_verify() -> None:
    grader = MathVerifyGrader()
    assert grade("**Answer:** $\\dfrac{1}{2}$.", "\\frac{1}{2}", grader=grader).correct
    assert grader.worker_calls == 0
    # control: a case that needs math-verify is counted
    assert grade("Answer: 0.5", "\\frac{1}{2}", grader=grader).correct
    assert grader.worker_calls == 1


def test_grader_names_carry_the_grading_version() -> None:
    assert GRADER_VERSION >= 2  # 1 credited any box
    assert MathVerifyGrader().name == MV_NAME
    assert ExactGrader().name == f"exact/final-answer-v{GRADER_VERSION}"
    assert grade("Answer: 7", "7", grader=ExactGrader()).grader == ExactGrader().name


def test_get_grader() -> None:
    assert isinstance(get_grader("math-verify"), MathVerifyGrader)
    assert isinstance(get_grader("exact"), ExactGrader)
    with pytest.raises(ValueError, match="math-verify, exact"):
        get_grader("sympy")
    with pytest.raises(ValueError, match="timeout"):
        MathVerifyGrader(timeout=0)


@pytest.mark.parametrize(("candidate", "gold", "math_verify", "exact"), EQUIVALENCES)
def test_exact_grader(candidate: str, gold: str, math_verify: bool, exact: bool) -> None:
    assert ExactGrader().check(candidate, gold) is exact
    assert grade(f"\\boxed{{{candidate}}}", gold, grader=ExactGrader()).correct is exact


# ---------------------------------------------------------------------------------------------
# Never raises, never hangs
# ---------------------------------------------------------------------------------------------


def _grade_in_thread(response: str, gold: str, timeout: float, wait: float) -> tuple[GradeResult | None, float]:
    """Grade in a non-main thread; the result (None if still running after ``wait`` s) and the time."""
    results: list[GradeResult] = []

    def target() -> None:
        results.append(grade(response, gold, timeout=timeout))

    thread = threading.Thread(target=target, daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(wait)
    return (results[0] if results else None), time.monotonic() - start


def test_pathological_power_times_out_off_the_main_thread() -> None:
    assert grade("Answer: 0.5", "\\frac{1}{2}").correct  # start a worker outside the timed part
    result, elapsed = _grade_in_thread("\\boxed{9^{9^{9^{9^{9}}}}}", "1", timeout=1.0, wait=10.0)
    assert result is not None, "grade hung"
    assert elapsed < 4.0
    assert result.timed_out and not result.correct
    assert result.extracted == "9^{9^{9^{9^{9}}}}"
    # the killed worker is replaced transparently
    assert grade("Answer: \\sqrt{8}", "2\\sqrt{2}").correct


def test_huge_latex_is_refused_quickly_in_a_thread() -> None:
    huge = "\\frac{" + "x+" * 5000 + "1}{2}"
    result, elapsed = _grade_in_thread(f"Answer: {huge}", "1", timeout=5.0, wait=10.0)
    assert result is not None and elapsed < 2.0
    assert not result.correct and not result.timed_out
    assert "not verified" in (result.error or "")


def test_concurrent_callers_get_correct_results() -> None:
    cases = [(f"Answer: {n}/2", f"\\frac{{{n}}}{{2}}", True) for n in range(1, 5)]
    cases += [(f"Answer: {n}/3", f"\\frac{{{n}}}{{2}}", False) for n in range(1, 5)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda case: grade(case[0], case[1]), cases))
    assert [r.correct for r in results] == [case[2] for case in cases]


class _RaisingGrader:
    name = "raising==0"

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def check(self, candidate: str, gold: str) -> bool:
        raise self.exc


def test_grade_never_raises() -> None:
    result = grade("Answer: 1", "1", grader=_RaisingGrader(RuntimeError("boom")))
    assert (result.correct, result.error, result.grader) == (False, "RuntimeError: boom", "raising==0")
    result = grade("Answer: 1", "1", grader=_RaisingGrader(TimeoutError()))
    assert result.timed_out and not result.correct
    result = grade(None, "1")  # type: ignore[arg-type]
    assert not result.correct and result.error is not None


def test_many_towers_cost_one_time_limit() -> None:
    """Twenty boxed towers are one set answer: one verification, one time limit for the response."""
    assert grade("Answer: 0.5", "\\frac{1}{2}").correct  # start a worker outside the timed part
    towers = " ".join("\\boxed{9^{9^{9^{" + str(n) + "}}}}" for n in range(2, 22))
    result, elapsed = _grade_in_thread(towers, "1", timeout=1.0, wait=10.0)
    assert result is not None and elapsed < 4.0
    assert result.timed_out and not result.correct


# ---------------------------------------------------------------------------------------------
# Answer cases of the peers' test suites, as full responses through grade() with math-verify.
# Sources (the cases, restated; no code): huggingface/Math-Verify tests/test_all.py, the Minerva
# answer format lighteval evaluates ("Final Answer: The final answer is ... I hope it is correct."),
# verl's DAPO reward (the last "Answer:" line, any case), QwenLM/Qwen2.5-Math's grader checks
# (evaluation/grader.py), and the MATH-500 answers the CRISP paper evaluates on.
# ---------------------------------------------------------------------------------------------

PEER_CASES = [
    # Math-Verify
    ("If $2-x=p$, then $x=2-p$. Thus $x-p=\\boxed{2-2p}$.", "2-2p"),
    (
        "Therefore, the polar coordinates are $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$",
        "\\left( 3, \\frac{\\pi}{2} \\right)",
    ),
    ("$=2+\\frac{5}{3}+1=\\boxed{\\frac{14}{3}}$", "\\frac{14}{3}"),
    ("Therefore, $\\boxed{\\text{Evelyn}}$ is our answer.", "\\text{Evelyn}"),
    ("a total loss of $\\boxed{28\\%}$.", "28\\%"),
    # Minerva / lighteval
    ("... = 28 \\%.\nFinal Answer: The final answer is $28 \\%$. I hope it is correct.", "28\\%"),
    ("so it is 72.\nFinal Answer: The final answer is $72$. I hope it is correct.", "72"),
    # verl's DAPO reward
    ("Reasoning steps...\nanswer: 25", "25"),
    ("Reasoning steps...\nAnswer: \\boxed{25}", "25"),
    ("Reasoning steps...\nAnswer: $\\frac{3}{4}$.", "0.75"),
    # Qwen2.5-Math's grader
    ("We get $\\boxed{1/12}$.", "\\frac{1}{12}"),
    ("The point is $\\boxed{(1,4.5)}$.", "(1,\\frac{9}{2})"),
    ("The final answer is $16.0$", "16"),
    ("\\boxed{\\frac{x}{7}+\\frac{2}{7}}", "\\frac{x+2}{7}"),
    ("\\boxed{\\left( 6, -\\frac{3}{8} \\right)}", "(6, -\\frac{3}{8})"),
    ("\\boxed{\\begin{pmatrix}-10\\\\6\\end{pmatrix}}", "\\begin{pmatrix} -10 \\\\ 6 \\end{pmatrix}"),
    # MATH-500 answers, written as reasoning models end their responses
    ("**Final Answer**\n\\[\n\\boxed{p - q}\n\\]", "p - q"),
    ("**Final Answer:** $\\boxed{\\dfrac{1}{2}}$", "\\frac{1}{2}"),
    ("The solutions are $\\boxed{-2}$ and $\\boxed{1}$.", "1, -2"),
    ("Thus, the final answer is $\\boxed{9}$.", "9"),
]


@pytest.mark.parametrize(("response", "gold"), PEER_CASES)
def test_the_peers_answer_cases_are_credited(response: str, gold: str) -> None:
    result = grade(response, gold)
    assert result.correct, result
