"""Answer extraction and grading: did a response reach the gold answer?

Only the response's final answer counts: its last ``Answer:`` line, or its last ``\\boxed{}`` when
that comes after every answer line; boxes that end the response together (``\\boxed{-2} and
\\boxed{1}``) are one set answer. An answer the response gave earlier and then revised is not
credited, so a response that boxes several guesses cannot collect a reward for one of them. (The
CRISP paper's grader credited the last answer line OR any box; crisp deliberately does not.)
Every result records which grader produced it, with GRADER_VERSION, because the grader alone can
move accuracy by many points.

math-verify calls run in a small persistent worker process, one per concurrent caller. The parent
waits for the reply with a deadline and kills the worker when the deadline passes. math-verify's
own timeout uses ``signal.alarm``, which only works in the main thread and cannot interrupt long C
calls such as a huge integer power; killing a process works from any thread and always.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.metadata
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

# Changes whenever what is credited changes; part of every grader's name, hence of every summary.
# 1: the last answer line or any box. 2: the final answer only.
GRADER_VERSION = 2
MAX_CANDIDATE_CHARS = 2000  # longer answers are wrong without calling sympy
MAX_SET_GAP_CHARS = 40  # boxes further apart than this are separate answers, not one set
WORKER_START_TIMEOUT = 120.0  # seconds to start the worker and import sympy; not the per-call limit

# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------

# "Answer: 42", "answer: 42", "Final Answer: 42", "**Final Answer:** 42", "**Answer**: 42",
# "## Answer: 42", "> Answer: 42"
_ANSWER_LINE = re.compile(
    r"^[ \t]*(?:[#>]+[ \t]*)?(?:\*\*|__)?(?:final[ \t]+)?answer[ \t]*(?:\*\*|__)?[ \t]*:(.*)$",
    re.IGNORECASE | re.MULTILINE,
)
# "Therefore, the final answer is $5$." on the last line
_FINAL_ANSWER_IS = re.compile(r"\bthe final answer is\b[ \t]*:?(.*)$", re.IGNORECASE)
# the Minerva/lighteval format: "Final Answer: The final answer is $5$. I hope it is correct."
_HOPE_SUFFIX = re.compile(r"\bI hope it is correct\W*$", re.IGNORECASE)
_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
_MATH_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_TRAILING_PUNCTUATION = ".,;:"
# what may stand between boxes of one set answer: spaces, math delimiters, commas, "and"/"or"
_SET_GAP = re.compile(
    r"(?:\s|[$,;&]|\\[()\[\]]|\\\\|\\q?quad\b|\\text\s*\{\s*(?:and|or|,)\s*\}|\band\b|\bor\b)*",
    re.IGNORECASE,
)


def extract_answer_line(text: str) -> str | None:
    """Value of the last answer line (``Answer:``, ``Final Answer:``, any case, markdown around it),
    else of a last line saying "the final answer is ..."; None if there is none or it is empty.

    Tolerates markdown bold, ``$...$`` around the value, boxes in it, trailing ``.,;:``.
    """
    found = _answer_line(text)
    return found[1] if found else None


def _answer_line(text: str) -> tuple[int, str] | None:
    """(where the line ends, its cleaned value) of the last answer line, or None. A last line
    saying "the final answer is ..." is the last answer line."""
    stripped = text.rstrip()
    said = _FINAL_ANSWER_IS.search(stripped[stripped.rfind("\n") + 1 :])
    if said is not None and (value := _clean_value(said.group(1))):
        return len(stripped), value
    matches = list(_ANSWER_LINE.finditer(text))
    if not matches:
        return None
    match = matches[-1]
    value = _clean_value(match.group(1))
    return (match.end(), value) if value else None


def _clean_value(value: str) -> str:
    value = _HOPE_SUFFIX.sub("", value.strip()).strip()
    said = _FINAL_ANSWER_IS.match(value)  # "Final Answer: The final answer is $5$."
    if said:
        value = said.group(1).strip()
    for marker in ("**", "__"):
        value = value.removeprefix(marker).removesuffix(marker).strip()
    value = value.rstrip(_TRAILING_PUNCTUATION).strip()
    value = _strip_math_delimiters(value).rstrip(_TRAILING_PUNCTUATION).strip()
    boxed = _final_boxes(value)
    return boxed[1] if boxed else value


def _strip_math_delimiters(value: str) -> str:
    for left, right in _MATH_DELIMITERS:
        if len(value) >= len(left) + len(right) and value.startswith(left) and value.endswith(right):
            inner = value[len(left) : len(value) - len(right)]
            if left not in inner:  # "$5$ and $6$" is not one wrapped value
                return inner.strip()
    return value


def extract_boxed(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` / ``\\fbox{...}``, in order; unclosed boxes are skipped."""
    return [text[start:end] for _, start, end in _box_spans(text)]


def _box_spans(text: str) -> list[tuple[int, int, int]]:
    """(command start, content start, content end) of every closed box, ordered by start, in one
    pass over the text.

    One pass, not one scan per box: thousands of unclosed ``\\boxed{`` (a degenerate rollout)
    would otherwise cost quadratic time. An escaped character, e.g. ``\\{`` or ``\\}``, does not count.
    """
    box_braces = {match.end() - 1: match.start() for match in _BOX_START.finditer(text)}
    open_boxes: list[tuple[int, int, int]] = []  # (brace depth inside the box, command start, content start)
    spans = []
    depth, i = 0, 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
            if i in box_braces:
                open_boxes.append((depth, box_braces[i], i + 1))
        elif char == "}":
            if open_boxes and open_boxes[-1][0] == depth:
                _, command, start = open_boxes.pop()
                spans.append((command, start, i))
            depth -= 1
        i += 1
    return sorted(spans)


def _final_boxes(text: str) -> tuple[int, str] | None:
    """(where the group starts, the answer) of the boxes that end ``text`` together: the last
    outermost box, with the boxes before it that only spaces, delimiters, commas or "and"/"or"
    separate from it, as one comma-separated set answer. None without a closed, non-empty box."""
    spans = _box_spans(text)
    by_command = {span[0]: span for span in spans}
    outermost: list[tuple[int, int, int]] = []
    for span in spans:
        if not outermost or span[0] > outermost[-1][2]:  # not inside the previous outermost box
            outermost.append(span)
    group: list[tuple[int, int, int]] = []
    for span in reversed(outermost):
        if group:
            gap = text[span[2] + 1 : group[-1][0]]
            if len(gap) > MAX_SET_GAP_CHARS or not _SET_GAP.fullmatch(gap):
                break
        group.append(span)
    members: dict[str, None] = {}  # ordered and distinct: "\boxed{5} \boxed{5}" is 5
    for _, start, end in reversed(group):
        start, end = _inside_lone_boxes(text, start, end, by_command)
        if start < end:
            members[text[start:end]] = None
    return (group[-1][0], ", ".join(members)) if members else None


def _inside_lone_boxes(text: str, start: int, end: int, by_command: dict) -> tuple[int, int]:
    """The content ``text[start:end]`` without surrounding spaces and without boxes that wrap all
    of it (``\boxed{\boxed{5}}`` is 5); iterative, for degenerate nests thousands deep."""
    while True:
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        inner = by_command.get(start)
        if inner is None or inner[2] != end - 1:
            return start, end
        start, end = inner[1], inner[2]


def final_answer(response: str) -> tuple[str, str] | None:
    """(path, answer) of the response's final answer: "answer_line" for its last answer line,
    "boxed" for its final boxes when they come after every answer line; None if it gives none."""
    line = _answer_line(response)
    boxes = _final_boxes(response)
    if boxes is not None and (line is None or boxes[0] >= line[0]):
        return "boxed", boxes[1]
    if line is not None:
        return "answer_line", line[1]
    return None


# ---------------------------------------------------------------------------------------------
# Graders
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GradeResult:
    """Outcome of grading one response.

    ``extracted`` is the response's final answer (None if it gives none); ``path`` says where it
    came from: "answer_line" or "boxed". ``timed_out``/``error`` report a verification that timed
    out or failed.
    """

    correct: bool
    extracted: str | None
    path: str | None
    grader: str
    timed_out: bool = False
    error: str | None = None


class Grader(Protocol):
    """Checks one extracted candidate against a gold answer."""

    name: str

    def check(self, candidate: str, gold: str) -> bool:
        """True if equivalent; raises TimeoutError when the check ran out of time."""
        ...


def _drop_spaces(text: str) -> str:
    """Whitespace removed unless it separates two letters or digits ("\\pi r" is not "\\pir",
    "2 3" is not 23), where it becomes one space."""
    return re.sub(r"(?<![A-Za-z0-9]) | (?![A-Za-z0-9])", "", re.sub(r"\s+", " ", text))


def _normalise_latex(text: str) -> str:
    """Cheap, conservative normalisation: equal results mean equal answers."""
    text = _strip_math_delimiters(text.strip().rstrip(".").strip())
    text = re.sub(r"\\(?:left|right)\b", "", text)
    text = re.sub(r"\\[dt]frac\b", r"\\frac", text)
    return _drop_spaces(text)


class MathVerifyGrader:
    """math-verify equivalence with a hard time limit that works from any thread.

    ``timeout`` bounds the time math-verify spends on one response in ``grade``, however many
    candidates it holds (plus the time to start a worker process when none is running).
    ``worker_calls`` counts the checks this grader sent to math-verify; the others matched the gold
    answer as normalised strings and never left the process.
    """

    def __init__(self, timeout: float = 5.0) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.timeout = timeout
        self.worker_calls = 0
        try:
            version = importlib.metadata.version("math-verify")
        except importlib.metadata.PackageNotFoundError:
            version = "missing"
        self.name = f"math-verify=={version}/final-answer-v{GRADER_VERSION}"

    def check(self, candidate: str, gold: str) -> bool:
        if _normalise_latex(candidate) == _normalise_latex(gold):
            return True  # fast path: the common case never leaves this process
        if len(candidate) > MAX_CANDIDATE_CHARS:
            raise ValueError(f"candidate has {len(candidate)} chars (> {MAX_CANDIDATE_CHARS}); not verified")
        self.worker_calls += 1
        with _borrow_worker() as worker:
            return worker.verify(candidate, gold, self.timeout)


def _normalise_exact(text: str) -> str:
    text = _drop_spaces(_strip_math_delimiters(text.strip())).rstrip(".").removeprefix("+")
    if re.fullmatch(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?", text):
        text = text.replace(",", "")  # thousands separators
    # one way to match each number (no nested quantifiers: linear time on 10,000 digits); string
    # operations, not Decimal, so that no digit is rounded away and no length limit applies
    if re.fullmatch(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)", text):
        sign = "-" if text.startswith("-") else ""
        whole, _, fraction = text.lstrip("+-").partition(".")
        whole, fraction = whole.lstrip("0") or "0", fraction.rstrip("0")
        if whole == "0" and not fraction:
            return "0"  # "-0", "0.00"
        return sign + whole + ("." + fraction if fraction else "")  # "07", "7.0", "+7" -> "7"
    return text


class ExactGrader:
    """Normalised string equality, for the built-in synthetic task (no sympy, no worker)."""

    def __init__(self) -> None:
        self.name = f"exact/final-answer-v{GRADER_VERSION}"

    def check(self, candidate: str, gold: str) -> bool:
        return _normalise_exact(candidate) == _normalise_exact(gold)


GRADERS = ("math-verify", "exact")


def get_grader(name: str, *, timeout: float = 5.0) -> Grader:
    """The grader called ``name`` (one of GRADERS); ``timeout`` applies to math-verify only."""
    if name == "math-verify":
        return MathVerifyGrader(timeout)
    if name == "exact":
        return ExactGrader()
    raise ValueError(f"unknown grader {name!r}; choose one of {', '.join(GRADERS)}")


def grade(response: str, gold: str, *, grader: Grader | None = None, timeout: float = 5.0) -> GradeResult:
    """Grade the response's final answer (see ``final_answer``) against the gold answer. Never raises.

    One answer per response, checked once: with math-verify, returns within the grader's timeout
    (plus a worker start when none is running), in microseconds when the answer matches the gold
    as a string. ``timeout`` is used only when ``grader`` is None (a MathVerifyGrader); a given
    grader keeps its own.
    """
    name = getattr(grader, "name", "math-verify")
    try:
        grader = grader if grader is not None else MathVerifyGrader(timeout)
        name = grader.name
        found = final_answer(response)
        if found is None:
            return GradeResult(False, None, None, name)
        path, answer = found
        try:
            return GradeResult(grader.check(answer, str(gold)), answer, path, name)
        except TimeoutError:
            return GradeResult(False, answer, path, name, timed_out=True)
        except Exception as exc:  # a grader failure must not stop an evaluation
            return GradeResult(False, answer, path, name, error=f"{type(exc).__name__}: {exc}")
    except Exception as exc:
        return GradeResult(False, None, None, str(name), False, f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------------
# The math-verify worker process
# ---------------------------------------------------------------------------------------------


class _Worker:
    """One subprocess answering JSON-line requests on stdin/stdout; restarted after a kill."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner = os.getpid()

    def verify(self, candidate: str, gold: str, timeout: float) -> bool:
        proc = self._running()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps({"gold": gold, "candidate": candidate}).encode() + b"\n")
            proc.stdin.flush()
            line = _read_line(proc.stdout.fileno(), time.monotonic() + timeout)
        except (OSError, EOFError) as exc:
            self.close()
            raise RuntimeError(f"math-verify worker died: {exc}") from exc
        if line is None:
            self.close()
            raise TimeoutError(f"math-verify took longer than {timeout} s")
        try:
            reply = json.loads(line)
        except ValueError as exc:
            self.close()
            raise RuntimeError(f"math-verify worker sent a bad reply: {line[:200]!r}") from exc
        if reply.get("error"):
            raise RuntimeError(reply["error"])
        return bool(reply["correct"])

    def _running(self) -> subprocess.Popen[bytes]:
        if self._owner != os.getpid():
            # we are a forked child: the pipes belong to the parent, start our own process
            self._proc, self._owner = None, os.getpid()
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        src_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src_dir, env.get("PYTHONPATH")) if p)
        # a fresh interpreter (not fork, not multiprocessing): no inherited torch threads, and no
        # re-import of the caller's __main__, which the spawn start method would do
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from crisp.grading import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert self._proc.stdout is not None
        try:
            ready = _read_line(self._proc.stdout.fileno(), time.monotonic() + WORKER_START_TIMEOUT)
        except EOFError:
            ready = None
        if ready is None or not json.loads(ready).get("ready"):
            self.close()
            raise RuntimeError("the math-verify worker process failed to start (see stderr)")
        return self._proc

    def close(self) -> None:
        if self._proc is not None and self._owner == os.getpid():
            self._proc.kill()
            self._proc.wait()
            for pipe in (self._proc.stdin, self._proc.stdout):
                if pipe is not None:
                    pipe.close()
            self._proc = None


def _read_line(fd: int, deadline: float) -> bytes | None:
    """One line from ``fd``, or None if it did not arrive before ``deadline``; EOFError on EOF."""
    buffer = b""
    while not buffer.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return None
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            raise EOFError("worker closed its output")
        buffer += chunk
    return buffer


_idle_workers: list[_Worker] = []
_all_workers: list[_Worker] = []
_pool_lock = threading.Lock()


@contextlib.contextmanager
def _borrow_worker() -> Iterator[_Worker]:
    """An idle worker, or a new one: concurrent callers never wait on each other."""
    with _pool_lock:
        if _idle_workers:
            worker = _idle_workers.pop()
        else:
            worker = _Worker()
            _all_workers.append(worker)
    try:
        yield worker
    finally:
        with _pool_lock:
            _idle_workers.append(worker)


@atexit.register
def _close_workers() -> None:
    with _pool_lock:
        for worker in _all_workers:
            worker.close()


def _worker_main() -> None:
    """Body of the worker process: one JSON request per stdin line, one JSON reply per line."""
    import logging

    from math_verify import parse, verify

    # keep stray prints from sympy & co. out of the reply channel
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    # the parent enforces the time limit; math-verify warns that its own is disabled
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    @functools.lru_cache(maxsize=1024)
    def parsed(answer: str) -> list:
        # math-verify extracts from LaTeX delimiters; a bare "\frac12" or "\{1,2\}" is not found
        result = parse("\\boxed{" + answer + "}", parsing_timeout=None)
        return result or parse(f"${answer}$", parsing_timeout=None)

    replies.write('{"ready": true}\n')
    replies.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            gold, candidate = parsed(request["gold"]), parsed(request["candidate"])
            # gold first: verify() is not symmetric
            reply: dict = {"correct": bool(verify(gold, candidate, timeout_seconds=None))}
        except Exception as exc:
            reply = {"correct": False, "error": f"{type(exc).__name__}: {exc}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()
