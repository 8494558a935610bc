"""Reasoning anatomy: what a response spends its tokens on. Pure text and token-id analysis, no I/O.

Per response (`response_anatomy`):
  thinking / answer tokens  Qwen3's convention: `<think>\\n...\\n</think>\\n\\n<answer>`. The thinking
                            section runs from the start of the response to the end of its first
                            `</think>` (the tags count with it, the EOS with the answer, so thinking +
                            answer = all response tokens). A DeepSeek-R1-Distill response has only the
                            closing tag (its prompt opened the section), which splits the same way. A
                            response without `</think>` is all thinking if it, or its prompt, opened a
                            section that is still open (a truncated thought), and all answer otherwise
                            (no tags at all, or the thinking-free prompt that ends with an empty closed
                            `<think>\\n\\n</think>\\n\\n`). The split is found in the token ids.
  markers                   hesitation and self-verification phrases (DEFAULT_MARKERS), counted
                            case-insensitively in the decoded text, whole words only ("wait" does not
                            match "awaited"), any whitespace between a phrase's words. Overlapping
                            phrases are counted once, as the longest: "But wait" is one "but wait",
                            not also a "wait".
  repetition loop           some run of `loop_ngram` consecutive words (\\w+, lower-cased) occurs at
                            least `loop_repeats` times in the response (occurrences may overlap, so
                            one word repeated loop_ngram + loop_repeats - 1 times is a loop). Found
                            with a rolling hash in one pass over the words: linear in the length.

Over a set of responses (`anatomy_figures`): mean thinking and answer tokens per response, the
share of responses with a loop, and marker rates per 1,000 response tokens (the marker count of
all the responses over all their tokens, times 1,000).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache

# Qwen3's thinking-section tags; every other module takes them from here
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


DEFAULT_MARKERS = (
    "wait",
    "but wait",
    "hmm",
    "alternatively",
    "let me check",
    "let me verify",
    "double-check",
    "double check",
    "re-read",
)
LOOP_NGRAM = 20  # words in the repeated span
LOOP_REPEATS = 3  # occurrences that make it a loop


def find_sequence(ids: Sequence[int], pattern: Sequence[int], start: int = 0) -> int:
    """Index of the first occurrence of `pattern` in `ids` at or after `start`, or -1."""
    ids, pattern = list(ids), list(pattern)
    if not pattern:
        return -1
    i = start
    while True:
        try:
            i = ids.index(pattern[0], i)  # the scan for the first id runs in C
        except ValueError:
            return -1
        if ids[i : i + len(pattern)] == pattern:
            return i
        i += 1


def prompt_leaves_thinking_open(prompt_text: str) -> bool:
    """Whether the prompt ends inside a thinking section: its last `<think>` comes after its last
    `</think>` (an R1-Distill prompt's opened `<think>\n`, not the thinking-free mode's closed block)."""
    return prompt_text.rfind(THINK_OPEN) > prompt_text.rfind(THINK_CLOSE)


def thinking_end(
    response_ids: Sequence[int],
    close_ids: Sequence[int],
    text: str,
    decode: Callable[[Sequence[int]], str] | None = None,
) -> int | None:
    """The number of response tokens up to and including the first `</think>`, or None if there is none.

    Found in the ids when the tag is a token sequence of its own (one token in Qwen3's tokenizer);
    otherwise, if the decoded text has the tag and `decode` is given, the shortest prefix whose
    decoding contains it (a binary search: O(log T) decodes)."""
    at = find_sequence(response_ids, close_ids)
    if at >= 0:
        return at + len(close_ids)
    if THINK_CLOSE not in text or decode is None:
        return None
    low, high = 1, len(response_ids)  # decode(ids[:high]) contains the tag
    while low < high:
        middle = (low + high) // 2
        if THINK_CLOSE in decode(response_ids[:middle]):
            high = middle
        else:
            low = middle + 1
    return high


def thinking_split(
    response_ids: Sequence[int],
    *,
    close_ids: Sequence[int],
    open_ids: Sequence[int],
    text: str,
    prompt_open: bool,
    decode: Callable[[Sequence[int]], str] | None = None,
) -> tuple[int, int]:
    """(thinking tokens, answer tokens) of one response; they add up to len(response_ids)."""
    total = len(response_ids)
    end = thinking_end(response_ids, close_ids, text, decode)
    if end is not None:
        return end, total - end
    opened = prompt_open or find_sequence(response_ids, open_ids) >= 0 or THINK_OPEN in text
    return (total, 0) if opened else (0, total)


@lru_cache(maxsize=16)
def _marker_pattern(markers: tuple[str, ...]) -> re.Pattern:
    """One alternation, longest marker first, each in its own group; not inside a longer word."""
    ordered = sorted(markers, key=len, reverse=True)
    groups = "|".join("(" + r"\s+".join(re.escape(word) for word in m.split()) + ")" for m in ordered)
    return re.compile(rf"(?<!\w)(?:{groups})(?!\w)", re.IGNORECASE)


def count_markers(text: str, markers: Sequence[str]) -> dict[str, int]:
    """How often each marker occurs in `text` (rules in the module docstring), in the order given."""
    markers = [m for m in dict.fromkeys(markers) if m.split()]
    counts = dict.fromkeys(markers, 0)
    if not markers:
        return counts
    ordered = sorted(markers, key=len, reverse=True)  # the group order of _marker_pattern
    for match in _marker_pattern(tuple(markers)).finditer(text):
        counts[ordered[match.lastindex - 1]] += 1
    return counts


_MODULUS = (1 << 61) - 1  # a Mersenne prime: two distinct spans share a hash with odds ~ ngram / 2**61
_BASE = 1_000_003


def has_repetition_loop(text: str, ngram: int = LOOP_NGRAM, repeats: int = LOOP_REPEATS) -> bool:
    """Whether some run of `ngram` consecutive words occurs at least `repeats` times in `text`."""
    ids: dict[str, int] = {}
    words = [ids.setdefault(w, len(ids) + 1) for w in re.findall(r"\w+", text.lower())]
    if len(words) < ngram:
        return False
    drop = pow(_BASE, ngram - 1, _MODULUS)  # weight of the word leaving the window
    seen: Counter[int] = Counter()
    value = 0
    for i, word in enumerate(words):
        if i >= ngram:
            value = (value - words[i - ngram] * drop) % _MODULUS
        value = (value * _BASE + word) % _MODULUS
        if i >= ngram - 1:
            seen[value] += 1
            if seen[value] >= repeats:
                return True
    return False


def response_anatomy(
    response_ids: Sequence[int],
    text: str,
    *,
    close_ids: Sequence[int],
    open_ids: Sequence[int],
    prompt_open: bool,
    markers: Sequence[str] = DEFAULT_MARKERS,
    loop_ngram: int = LOOP_NGRAM,
    loop_repeats: int = LOOP_REPEATS,
    decode: Callable[[Sequence[int]], str] | None = None,
) -> dict:
    """The per-response fields an evaluation record carries (see the module docstring)."""
    thinking, answer = thinking_split(
        response_ids, close_ids=close_ids, open_ids=open_ids, text=text, prompt_open=prompt_open, decode=decode
    )
    return {
        "thinking_tokens": thinking,
        "answer_tokens": answer,
        "markers": count_markers(text, markers),
        "repetition_loop": has_repetition_loop(text, loop_ngram, loop_repeats),
    }


def anatomy_figures(rows: Sequence[dict]) -> dict:
    """Over records that carry `response_anatomy`'s fields (and `tokens`): mean thinking and answer
    tokens, loop rate, and marker rates per 1,000 response tokens ({} if no record has them)."""
    rows = [r for r in rows if "thinking_tokens" in r]
    if not rows:
        return {}
    tokens = sum(r["tokens"] for r in rows)
    counts: Counter[str] = Counter()
    for r in rows:
        counts.update(r["markers"])
    names = list(dict.fromkeys(m for r in rows for m in r["markers"]))  # first-seen order
    per_1k = {m: 1000 * counts[m] / tokens if tokens else 0.0 for m in names}
    return {
        "mean_thinking_tokens": sum(r["thinking_tokens"] for r in rows) / len(rows),
        "mean_answer_tokens": sum(r["answer_tokens"] for r in rows) / len(rows),
        "loop_rate": sum(bool(r["repetition_loop"]) for r in rows) / len(rows),
        "markers_per_1k_tokens": sum(per_1k.values()),
        "marker_rates_per_1k_tokens": per_1k,
    }
