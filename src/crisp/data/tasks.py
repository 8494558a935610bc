"""A task: where a run's problems come from, how they are graded, and what the task adds to training
and evaluation. The training methods and the evaluation ask the task; they never ask which task it is.

- `ProblemSourceTask`: a problem file or a hub benchmark, graded with math-verify; SFT trains on the
  problems' reference solutions.
- `crisp.data.synthetic.SyntheticTask`: the built-in synthetic task (its own SFT corpus, an exact
  grader, a step audit of every response, a teacher-forced probe).

A new task is one new file with a `Task` subclass, and one line in `get_task`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from crisp.data.loaders import load_problems
from crisp.data.problems import Problem

if TYPE_CHECKING:  # (crisp.methods imports the tasks)
    from crisp.methods.sft import SFTConfig
    from crisp.prompts import PromptBuilder


@dataclass(frozen=True)
class SFTExample:
    prompt_ids: list[int]
    response_ids: list[int]
    loss_mask: list[int]  # one per response token: 1 = trained on


Probe = Callable[[object], dict[str, float]]  # model -> probe/* metrics


class Task:
    name: str = ""
    grader: str = "math-verify"  # crisp.grading.GRADERS

    def train_problems(self, *, seed: int, size: int, levels: Sequence[int], limit: int | None) -> list[Problem]:
        raise NotImplementedError

    def eval_problems(self, limit: int | None = None) -> list[Problem]:
        raise NotImplementedError

    def audit(self, problem: Problem, response: str) -> dict:
        """Figures the task adds to one graded response's record (evaluate.score_rollouts)."""
        return {}

    def audit_summary(self, records: Sequence[dict]) -> dict:
        """Figures the task adds to a summary, from records that went through `audit`."""
        return {}

    def sft_examples(self, cfg: SFTConfig, builder: PromptBuilder) -> list[SFTExample]:
        """The SFT corpus of an SFTConfig (crisp.methods.sft): each training problem's reference solution."""
        tokenizer = builder.tokenizer
        examples = []
        for problem in self.train_problems(
            seed=cfg.seed, size=cfg.data.size, levels=cfg.data.levels, limit=cfg.data.limit
        ):
            if not problem.solution:
                raise ValueError(f"{self.name}: problem {problem.id} has no solution to train on")
            response = tokenizer(problem.solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            examples.append(SFTExample(builder.student_ids(problem), response, [1] * len(response)))
        return examples

    def probe(self, builder) -> Probe | None:
        """A function logging probe/* metrics of a model during SFT, if the task has one."""
        return None

    def vocabulary_texts(self, seed: int) -> list[str]:
        """Texts covering every word a tiny word-level tokenizer for this task needs."""
        problems = self.train_problems(seed=seed, size=0, levels=(), limit=None)
        return [text for p in problems for text in (p.question, p.answer, p.solution or "")]


class ProblemSourceTask(Task):
    """Problems from a file (.jsonl/.json/.parquet) or a hub benchmark name (crisp.data.loaders)."""

    def __init__(self, source: str):
        self.name = source

    def train_problems(self, *, seed: int, size: int, levels: Sequence[int], limit: int | None) -> list[Problem]:
        return load_problems(self.name, limit=limit)

    def eval_problems(self, limit: int | None = None) -> list[Problem]:
        return load_problems(self.name, limit=limit)


def get_task(source: str) -> Task:
    """The task behind a data source or benchmark name."""
    if source == "synthetic":
        from crisp.data.synthetic import SyntheticTask

        return SyntheticTask()
    return ProblemSourceTask(source)
