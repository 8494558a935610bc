"""The one record every benchmark and training set is turned into."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """A question with its gold answer; ``difficulty`` keeps the source's label (e.g. "3")."""

    id: str
    question: str
    answer: str
    solution: str | None = None
    difficulty: str | None = None
    source: str = ""
