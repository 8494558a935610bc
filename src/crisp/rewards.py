"""Rewards and advantages for GRPO-style training (SIRI): group advantages, the length-capped
reward, and DAPO's dynamic-sampling filter.

Pure functions: decoding and answer grading are injected by the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

from torch import Tensor

__all__ = ["group_advantages", "length_capped_reward", "dynamic_sampling_mask"]


def group_advantages(rewards: Tensor, group_size: int, *, scale_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO advantages: each reward minus the mean of its group, optionally over the group's std.

    ``A_i = (R_i - mean_g(R)) / (std_g(R) + eps)`` with the *population* standard deviation
    (``unbiased=False``, divide by ``G``), or ``A_i = R_i - mean_g(R)`` when ``scale_by_std`` is
    false. A group whose rewards are all equal gets advantages of exactly 0.

    Args:
        rewards: ``(B * G,)`` with the ``G`` samples of one prompt contiguous, or ``(B, G)``.
        group_size: ``G``; must divide the number of rewards (and equal ``rewards.shape[1]`` for 2-D).
        scale_by_std: divide by the group std (+ ``eps``).
        eps: added to the std to avoid division by zero.

    Returns:
        fp32 tensor with the shape of ``rewards``.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.dim() == 2:
        if rewards.shape[1] != group_size:
            raise ValueError(f"rewards is (B, G) with G = {rewards.shape[1]} but group_size = {group_size}")
    elif rewards.dim() == 1:
        if rewards.numel() % group_size != 0:
            raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    else:
        raise ValueError(f"rewards must be (B * G,) or (B, G), got shape {tuple(rewards.shape)}")

    grouped = rewards.float().reshape(-1, group_size)  # (B, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # (B, G)
    if scale_by_std:
        centred = centred / (grouped.std(dim=1, unbiased=False, keepdim=True) + eps)  # (B, G)
    return centred.reshape(rewards.shape)


def length_capped_reward(
    response_ids: Sequence[int],
    gold: str,
    *,
    cap: int,
    eos_id: int | Collection[int],
    decode: Callable[[Sequence[int]], str],
    grade: Callable[[str, str], bool],
) -> float:
    """SIRI / DeepScaleR length-capped reward: 1 if the response, clipped to ``cap`` tokens, ends
    (EOS) within the cap and its answer is correct, else 0.

    ``response_ids`` are the generated ids as produced, including the EOS if one was produced.
    The response is clipped to its first ``cap`` tokens. If no EOS lies inside the clipped part the
    response is truncated, either by the cap (it was longer than ``cap``) or by the generation limit
    (``max_new_tokens`` was hit without an EOS): a truncated response gets 0. Otherwise the text
    before the first EOS is decoded and graded: 1.0 if ``grade(text, gold)`` else 0.0.

    Args:
        response_ids: generated token ids.
        gold: the reference answer, passed to ``grade``.
        cap: the length cap ``L`` in tokens (``>= 1``).
        eos_id: the end-of-sequence id, or a collection of ids that all end a response.
        decode: ids (without the EOS) -> text.
        grade: ``(response_text, gold) -> bool``.
    """
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    eos_ids = {eos_id} if isinstance(eos_id, int) else set(eos_id)
    clipped = list(response_ids[:cap])
    end = next((i for i, token in enumerate(clipped) if token in eos_ids), None)
    if end is None:
        return 0.0  # truncated: by the cap, or by max_new_tokens without an EOS
    return 1.0 if grade(decode(clipped[:end]), gold) else 0.0


def dynamic_sampling_mask(rewards: Tensor) -> Tensor:
    """DAPO dynamic sampling: keep the groups whose rewards are not all equal.

    Args:
        rewards: ``(B, G)`` rewards of the ``G`` samples of each of ``B`` prompts.

    Returns:
        ``(B,)`` bool, true where the group has at least two different rewards (and therefore
        non-zero advantages).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (B, G), got shape {tuple(rewards.shape)}")
    return rewards.amax(dim=1) != rewards.amin(dim=1)  # (B,)
