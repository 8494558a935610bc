"""Answer extraction and grading: did a response reach the gold answer?

A response is correct if its last ``Answer:`` line OR any ``\\boxed{}`` verifies against the gold
answer (the CRISP paper's grader). Every result records which grader produced it, because the
grader alone can move accuracy by many points.

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

from crisp import __version__

MAX_CANDIDATE_CHARS = 2000  # longer candidates are wrong without calling sympy
MAX_CANDIDATES = 16  # the answer line and the last boxes; bounds the time one response can take
WORKER_START_TIMEOUT = 120.0  # seconds to start the worker and import sympy; not the per-call limit

# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------

# "Answer: 42", "**Answer:** 42", "**Answer: 42**", "## Answer: 42", "> Answer: 42"
_ANSWER_LINE = re.compile(r"^\s*(?:[#>]+\s*)?(?:\*\*|__)?Answer\s*(?:\*\*|__)?\s*:(.*)$")
_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
_MATH_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def extract_answer_line(text: str) -> str | None:
    """Value after the last line starting with ``Answer:``; None if there is none or it is empty.

    Tolerates markdown bold, ``$...$`` around the value, a lone ``\\boxed{...}``, a trailing period.
    """
    value = None
    for line in text.splitlines():
        match = _ANSWER_LINE.match(line)
        if match:
            value = match.group(1)
    if value is None:
        return None
    value = value.strip()
    for marker in ("**", "__"):
        value = value.removeprefix(marker).removesuffix(marker).strip()
    value = _strip_math_delimiters(value.rstrip(".").strip()).rstrip(".").strip()
    boxes = _box_spans(value)
    if len(boxes) == 1 and _BOX_START.match(value) and value.endswith("}"):
        start, end = boxes[0]
        value = value[start:end].strip()
    return value or None


def _strip_math_delimiters(value: str) -> str:
    for left, right in _MATH_DELIMITERS:
        if len(value) >= len(left) + len(right) and value.startswith(left) and value.endswith(right):
            inner = value[len(left) : len(value) - len(right)]
            if left not in inner:  # "$5$ and $6$" is not one wrapped value
                return inner.strip()
    return value


def extract_boxed(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` / ``\\fbox{...}``, in order; unclosed boxes are skipped."""
    return [text[start:end] for start, end in _box_spans(text)]


def _box_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every closed box's content, ordered by start, in one pass over the text.

    One pass, not one scan per box: thousands of unclosed ``\\boxed{`` (a degenerate rollout)
    would otherwise cost quadratic time. An escaped character, e.g. ``\\{`` or ``\\}``, does not count.
    """
    box_braces = {match.end() - 1 for match in _BOX_START.finditer(text)}
    open_boxes: list[tuple[int, int]] = []  # (brace depth inside the box, content start)
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
                open_boxes.append((depth, i + 1))
        elif char == "}":
            if open_boxes and open_boxes[-1][0] == depth:
                spans.append((open_boxes.pop()[1], i))
            depth -= 1
        i += 1
    return sorted(spans)


def _candidates(response: str) -> list[tuple[str, str]]:
    """(path, candidate) pairs: the answer line, then boxes from last to first; distinct, at most
    MAX_CANDIDATES."""
    paths: dict[str, str] = {}  # candidate -> where it came from, in order
    line = extract_answer_line(response)
    if line is not None:
        paths[line] = "answer_line"
    for start, end in reversed(_box_spans(response)):
        if len(paths) == MAX_CANDIDATES:
            break
        box = response[start:end].strip()
        if box:
            paths.setdefault(box, "boxed")
    return [(path, candidate) for candidate, path in paths.items()]


# ---------------------------------------------------------------------------------------------
# Graders
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GradeResult:
    """Outcome of grading one response.

    ``extracted`` is the candidate that verified, else the first candidate (answer line, else the
    last box); ``path`` says where it came from. ``timed_out``/``error`` report any verification
    call that timed out or failed while grading this response.
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


def _normalise_latex(text: str) -> str:
    """Cheap, conservative normalisation: equal results mean equal answers."""
    text = _strip_math_delimiters(text.strip().rstrip(".").strip())
    text = re.sub(r"\\(?:left|right)\b", "", text)
    text = re.sub(r"\\[dt]frac\b", r"\\frac", text)
    # drop whitespace unless it separates two letters ("\pi r" must not become "\pir")
    return re.sub(r"(?<![A-Za-z])\s+|\s+(?![A-Za-z])", "", text)


class MathVerifyGrader:
    """math-verify equivalence with a hard time limit that works from any thread.

    ``timeout`` bounds the time math-verify spends on one response in ``grade``, however many
    candidates it holds (plus the time to start a worker process when none is running).
    """

    def __init__(self, timeout: float = 5.0) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.timeout = timeout
        try:
            version = importlib.metadata.version("math-verify")
        except importlib.metadata.PackageNotFoundError:
            version = "missing"
        self.name = f"math-verify=={version}"

    def check(self, candidate: str, gold: str, *, deadline: float | None = None) -> bool:
        """``deadline``: a time.monotonic() value to give up at, if sooner than ``timeout`` from now."""
        if _normalise_latex(candidate) == _normalise_latex(gold):
            return True  # fast path: the common case never leaves this process
        if len(candidate) > MAX_CANDIDATE_CHARS:
            raise ValueError(f"candidate has {len(candidate)} chars (> {MAX_CANDIDATE_CHARS}); not verified")
        limit = self.timeout if deadline is None else min(self.timeout, deadline - time.monotonic())
        if limit <= 0:
            raise TimeoutError("this response's math-verify time is spent")
        with _borrow_worker() as worker:
            return worker.verify(candidate, gold, limit)


def _normalise_exact(text: str) -> str:
    text = re.sub(r"\s+", "", _strip_math_delimiters(text.strip())).rstrip(".").removeprefix("+")
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
        self.name = f"exact=={__version__}"

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
    """Grade a response against the gold answer. Never raises.

    With math-verify, returns within the grader's timeout (plus a worker start when none is
    running), in microseconds when the answer matches the gold as a string; candidates left when
    the time is spent count as timed out. ``timeout`` is used only when ``grader`` is None (a
    MathVerifyGrader); a given grader keeps its own.
    """
    name = getattr(grader, "name", "math-verify")
    try:
        grader = grader if grader is not None else MathVerifyGrader(timeout)
        name = grader.name
        check = grader.check
        if isinstance(grader, MathVerifyGrader):  # one time limit for the whole response
            check = functools.partial(grader.check, deadline=time.monotonic() + grader.timeout)
        candidates = _candidates(response)
        timed_out, error = False, None
        for path, candidate in candidates:
            try:
                if check(candidate, str(gold)):
                    return GradeResult(True, candidate, path, name, timed_out, error)
            except TimeoutError:
                timed_out = True
            except Exception as exc:  # a grader failure must not stop an evaluation
                error = error or f"{type(exc).__name__}: {exc}"
        first_path, first = candidates[0] if candidates else (None, None)
        return GradeResult(False, first, first_path, name, timed_out, error)
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
