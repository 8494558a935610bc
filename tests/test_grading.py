"""Answer extraction, math-verify grading with hard timeouts, and the exact grader."""

from __future__ import annotations

import importlib.metadata
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import crisp
import crisp.grading as grading
from crisp.grading import (
    ExactGrader,
    GradeResult,
    MathVerifyGrader,
    extract_answer_line,
    extract_boxed,
    get_grader,
    grade,
)

MV_NAME = f"math-verify=={importlib.metadata.version('math-verify')}"

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
    ],
)
def test_extract_answer_line(text: str, expected: str) -> None:
    assert extract_answer_line(text) == expected


@pytest.mark.parametrize(
    "text", ["no answer here", "The Answer: is not at line start", "Answer:", "Answer:   $$"]
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


# ---------------------------------------------------------------------------------------------
# math-verify grading
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("candidate", "gold", "correct"),
    [
        ("0.5", "\\frac{1}{2}", True),
        ("1/2", "\\frac{1}{2}", True),
        ("\\dfrac{1}{2}", "\\frac12", True),
        ("\\sqrt{8}", "2\\sqrt{2}", True),
        ("\\{2,1\\}", "\\{1,2\\}", True),
        ("(1,2]", "[1,2)", False),
        ("\\text{B}", "\\text{(B)}", True),
        ("1,000", "1000", True),
        ("x=3", "3", True),  # math-verify compares the right-hand side of a simple assignment
        ("10", "10\\%", True),  # math-verify is lenient about a percent sign either way
        ("0.333", "\\frac{1}{3}", False),  # rounded to 6 places before comparing
        ("0.3333333", "\\frac{1}{3}", True),
        ("3", "2", False),
        ("x", "\\frac{1}{2}", False),
    ],
)
def test_math_verify_equivalences(candidate: str, gold: str, correct: bool) -> None:
    result = grade(f"Work.\nAnswer: {candidate}", gold)
    assert result.correct is correct, result
    assert result.extracted == candidate
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


def test_wrong_answer_line_but_earlier_box_right() -> None:
    result = grade("So \\boxed{12}.\nWait, maybe not.\nAnswer: 13", "12")
    assert (result.correct, result.path, result.extracted) == (True, "boxed", "12")


def test_both_paths_wrong_reports_answer_line() -> None:
    result = grade("\\boxed{1} ... \\boxed{2}\nAnswer: 3", "4")
    assert (result.correct, result.path, result.extracted) == (False, "answer_line", "3")
    result = grade("\\boxed{1} ... \\boxed{2}", "4")
    assert (result.correct, result.path, result.extracted) == (False, "boxed", "2")  # the last box


def test_last_answer_line_wins() -> None:
    text = "Answer: 3\nHmm, let me re-check.\nAnswer: 4"
    assert not grade(text, "3").correct
    assert grade(text, "4").correct


def test_fast_path_does_not_call_math_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_worker() -> None:
        raise AssertionError("math-verify worker used")

    monkeypatch.setattr(grading, "_borrow_worker", no_worker)
    assert grade("**Answer:** $\\dfrac{1}{2}$.", "\\frac{1}{2}").correct
    # control: a case that needs math-verify reaches the (broken) worker, and grade still returns
    result = grade("Answer: 0.5", "\\frac{1}{2}")
    assert not result.correct
    assert "math-verify worker used" in (result.error or "")


def test_grader_names() -> None:
    assert MathVerifyGrader().name == MV_NAME
    assert ExactGrader().name == f"exact=={crisp.__version__}"
    assert grade("Answer: 7", "7", grader=ExactGrader()).grader == f"exact=={crisp.__version__}"


def test_get_grader() -> None:
    assert isinstance(get_grader("math-verify"), MathVerifyGrader)
    assert isinstance(get_grader("exact"), ExactGrader)
    with pytest.raises(ValueError, match="math-verify, exact"):
        get_grader("sympy")
    with pytest.raises(ValueError, match="timeout"):
        MathVerifyGrader(timeout=0)


@pytest.mark.parametrize(
    ("candidate", "gold", "correct"),
    [
        ("07", "7", True),
        ("+7", "7", True),
        ("7.", "7", True),
        ("7.0", "7", True),
        (" 7 ", "7", True),
        ("-0", "0", True),
        ("1,000", "1000", True),
        ("2.50", "2.5", True),
        ("x + 1", "x+1", True),
        ("8", "7", False),
        ("-7", "7", False),
        ("1/2", "0.5", False),  # exact means exact: no arithmetic
    ],
)
def test_exact_grader(candidate: str, gold: str, correct: bool) -> None:
    assert ExactGrader().check(candidate, gold) is correct
    assert grade(f"\\boxed{{{candidate}}}", gold, grader=ExactGrader()).correct is correct


# ---------------------------------------------------------------------------------------------
# Never raises, never hangs
# ---------------------------------------------------------------------------------------------


def _grade_in_thread(
    response: str, gold: str, timeout: float, wait: float
) -> tuple[GradeResult | None, float]:
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


def test_candidate_count_is_capped() -> None:
    boxes = " ".join(f"\\boxed{{{n}}}" for n in range(100, 100 + grading.MAX_CANDIDATES + 4))
    assert grade(boxes, str(100 + grading.MAX_CANDIDATES + 3), grader=ExactGrader()).correct  # last box
    assert not grade(boxes, "100", grader=ExactGrader()).correct  # the first box is beyond the cap
