"""Boxing several guesses is not a way to collect GRPO reward: the reward the SIRI loop computes
(crisp.methods.grpo.LengthCappedReward -> crisp.rewards.length_capped_reward -> crisp.grading.grade, nothing
replaced) is 0 for such responses, and a policy trained on it unlearns guessing."""

from __future__ import annotations

import random

import pytest
import torch

from crisp.data.problems import Problem
from crisp.evaluate import score_rollouts
from crisp.grading import ExactGrader, extract_boxed
from crisp.methods.grpo import LengthCappedReward
from crisp.rewards import group_advantages
from crisp.rollout import Rollout

EOS = 0


class CharTokenizer:
    """One token per character (id = code point + 1) and EOS = 0: what LengthCappedReward needs of a
    tokenizer, so that a response's text reaches the grader unchanged."""

    eos_token_id = EOS

    def encode(self, text: str) -> tuple[int, ...]:
        return tuple(ord(char) + 1 for char in text)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i - 1) for i in ids if i != EOS)


def rollout(tokenizer: CharTokenizer, index: int, text: str) -> Rollout:
    return Rollout(
        prompt_index=index, prompt_ids=(1,), token_ids=tokenizer.encode(text) + (EOS,), text=text, finish_reason="stop"
    )


def loop_rewards(batch: list[Problem], texts: list[tuple[int, str]], grader: str) -> list[float]:
    """The rewards as the GRPO loop computes them: score the rollouts, then the capped rewards."""
    tokenizer = CharTokenizer()
    rollouts = [rollout(tokenizer, index, text) for index, text in texts]
    return LengthCappedReward(tokenizer, grader)(score_rollouts(batch, rollouts, grader), cap=10_000)


@pytest.mark.parametrize("grader", ["exact", "math-verify"])
def test_responses_that_box_several_guesses_get_no_reward(grader):
    batch = [Problem(id="p0", question="q", answer="12"), Problem(id="p1", question="q", answer="-2, 1")]
    texts = [
        (0, "Let me think.\n\\boxed{12}"),  # one answer, right: the control
        (0, "It could be \\boxed{3} \\boxed{5} \\boxed{7} \\boxed{12}"),  # every guess boxed
        (0, "It is $\\boxed{12}$ or $\\boxed{13}$."),
        (0, "I think \\boxed{12}. Wait, no: \\boxed{7}"),  # revised away from the right answer
        (0, "Answer: 12\nActually the answer is \\boxed{7}."),
        (0, "Answer: 3 or 5 or 12"),
        (1, "The roots are $\\boxed{-2}$ and $\\boxed{1}$."),  # a set answer is one answer
        (1, "The roots are $\\boxed{-2}$, $\\boxed{1}$ and $\\boxed{3}$."),
    ]
    assert loop_rewards(batch, texts, grader) == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def _any_box_reward(text: str, gold: str) -> float:
    """The grader crisp used to have (any box counts), for the control below."""
    return float(any(ExactGrader().check(box, gold) for box in extract_boxed(text)))


def _train_guessing_policy(reward_of, steps: int = 60, group: int = 8, seed: int = 0) -> float:
    """A fake policy with one choice: answer with one boxed guess, or box all four guesses.
    Trained by GRPO (group advantages, policy gradient on the choice); returns the final
    probability of boxing every guess."""
    rng = random.Random(seed)
    logits = torch.zeros(2, requires_grad=True)  # [one guess, all guesses]
    optimizer = torch.optim.SGD([logits], lr=0.5)
    for _ in range(steps):
        gold = rng.randint(1, 50)
        guesses = rng.sample([gold] + rng.sample([n for n in range(1, 51) if n != gold], 3), 4)
        probs = torch.softmax(logits, dim=0)
        sampler = torch.Generator().manual_seed(rng.randrange(2**31))
        choices = torch.multinomial(probs.detach(), group, replacement=True, generator=sampler)
        texts = [
            f"\\boxed{{{rng.choice(guesses)}}}" if c == 0 else " ".join(f"\\boxed{{{g}}}" for g in guesses)
            for c in choices.tolist()
        ]
        rewards = torch.tensor(reward_of(texts, str(gold)))
        advantages = group_advantages(rewards, group)
        loss = -(advantages * torch.log(probs[choices])).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return torch.softmax(logits, dim=0)[1].item()


def test_a_policy_trained_on_the_loop_reward_stops_boxing_every_guess():
    def loop_reward(texts: list[str], gold: str) -> list[float]:
        return loop_rewards([Problem(id="p", question="q", answer=gold)], [(0, text) for text in texts], "exact")

    def any_box(texts: list[str], gold: str) -> list[float]:
        return [_any_box_reward(text, gold) for text in texts]

    # control: with a reward that credits any box, the policy learns to box every guess
    assert _train_guessing_policy(any_box) > 0.9
    assert _train_guessing_policy(loop_reward) < 0.1
