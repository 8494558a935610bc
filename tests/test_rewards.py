"""Tests for crisp.rewards: advantages and rewards checked against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from crisp.rewards import dynamic_sampling_mask, group_advantages, length_capped_reward


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])  # two groups of 4
    adv = group_advantages(rewards, 4, eps=0.0)
    # group 0: mean 0.5, population std 0.5 -> +-1
    # group 1: mean 0.75, population std sqrt(0.75 * 0.25) = 0.4330
    std1 = math.sqrt(((0.25**2) * 3 + 0.75**2) / 4)
    expected = [1.0, -1.0, -1.0, 1.0, 0.25 / std1, 0.25 / std1, -0.75 / std1, 0.25 / std1]
    assert adv.shape == (8,)
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)


def test_group_advantages_two_dim_and_eps():
    rewards = torch.tensor([[2.0, 0.0], [3.0, 5.0]])
    adv = group_advantages(rewards, 2, eps=1e-6)
    assert adv.shape == (2, 2)
    assert adv.flatten().tolist() == pytest.approx([1 / (1 + 1e-6), -1 / (1 + 1e-6), -1 / (1 + 1e-6), 1 / (1 + 1e-6)])


def test_group_advantages_without_std():
    rewards = torch.tensor([[2.0, 0.0, 1.0], [3.0, 5.0, 4.0]])
    adv = group_advantages(rewards, 3, scale_by_std=False)
    assert adv.flatten().tolist() == pytest.approx([1.0, -1.0, 0.0, -1.0, 1.0, 0.0])


def test_all_equal_group_gives_zero_advantages():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    assert torch.equal(group_advantages(rewards, 3), torch.zeros(6))
    assert torch.equal(group_advantages(rewards, 3, scale_by_std=False), torch.zeros(6))


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="group"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(2, 3), 2)


# A toy tokenizer: ids are digits, 0 is EOS; the "answer" is the decoded digit string.
EOS = 0


def _decode(ids):
    return "".join(str(i) for i in ids)


def _grade(text, gold):
    return text.endswith(gold)


def _reward(ids, gold="42", cap=5):
    return length_capped_reward(ids, gold, cap=cap, eos_id=EOS, decode=_decode, grade=_grade)


def test_capped_reward_answer_before_the_cut():
    assert _reward([7, 4, 2, EOS]) == 1.0
    assert _reward([7, 7, 4, 2, EOS], cap=5) == 1.0  # EOS is exactly the last kept token
    assert _reward([4, 2, EOS, 9, 9, 9, 9], cap=5) == 1.0  # junk after EOS is ignored


def test_capped_reward_answer_after_the_cut():
    # correct and finished, but longer than the cap: truncated by the cap
    assert _reward([7, 7, 7, 4, 2, EOS], cap=5) == 0.0
    assert _reward([7, 7, 7, 7, 4, 2, EOS], cap=5) == 0.0


def test_capped_reward_truncated_by_generation_limit():
    # no EOS at all: generation hit max_new_tokens; counts as truncated even though short
    assert _reward([4, 2], cap=5) == 0.0


def test_capped_reward_wrong_answer():
    assert _reward([4, 3, EOS]) == 0.0


def test_capped_reward_decodes_without_eos_and_accepts_several_eos_ids():
    seen = []

    def decode(ids):
        seen.append(list(ids))
        return _decode(ids)

    assert length_capped_reward([4, 2, 11], "42", cap=8, eos_id={10, 11}, decode=decode, grade=_grade) == 1.0
    assert seen == [[4, 2]]
    with pytest.raises(ValueError, match="cap"):
        length_capped_reward([1], "1", cap=0, eos_id=EOS, decode=_decode, grade=_grade)


def test_dynamic_sampling_mask():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.25]])
    assert dynamic_sampling_mask(rewards).tolist() == [False, True, False, True]
