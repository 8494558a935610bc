"""Maximum-rollout-length schedules: SIRI's periodic ones (SIRI paper, section 4.3) and TFPI's stages.

Stages (``stage_at``, ``stage_starts``): training runs stage 0 for its number of steps, then stage 1,
and so on; each stage has its own maximum length (TFPI grows it, e.g. 4K -> 8K -> 16K).

Every schedule is periodic with cycle ``period`` (``T``) and works on the phase
``phi = 2 * pi * (t mod T) / T``. Every cycle is a compression half followed by an expansion half:

* ``"constant"``: ``L = L_max`` always.
* ``"stair"``: ``L = L_min`` for the first half of each cycle (``t mod T < T/2``, compression), then
  ``L = L_max`` for the second half (expansion). The paper defines the stair scheduler as switching
  from ``L_max`` down to ``L_min`` in the compression phase and back up in the expansion phase; its
  figure 7b discussion puts the stair's "direct 8K compression phase" in the same steps as the cosine
  scheduler's falling half (steps 960-1200 with T = 480) with the "subsequent" 16K expansion after
  it, so compression comes first, as for the two cosine schedules.
* ``"cosine"``: ``L = (L_max + L_min)/2 + (L_max - L_min)/2 * cos(phi)`` (= ``cos(2 pi t / T)``):
  ``L_max`` at ``t = 0``, ``L_min`` at ``T/2``.
* ``"stair_cosine"``, the paper's formula, with ``mid = (L_max + L_min)/2`` and
  ``amp = (L_max - L_min)/2``:

  - ``L_max`` for ``phi < pi/4`` or ``phi >= 7pi/4``;
  - ``mid + amp * cos(2 (phi - pi/4))`` for ``pi/4 <= phi < 3pi/4`` (descends ``L_max -> L_min``);
  - ``L_min`` for ``3pi/4 <= phi < 5pi/4``;
  - ``mid + amp * cos(2 (phi - 3pi/4))`` for ``5pi/4 <= phi < 7pi/4`` (ascends ``L_min -> L_max``:
    at ``5pi/4`` the argument is ``pi``, at ``7pi/4`` it is ``2pi``). This is the same curve as
    ``mid - amp * cos(2 (phi - 5pi/4))``, and the schedule is continuous.

The regions are decided with exact integer arithmetic on ``t mod T`` (``phi < pi/4`` is
``8 (t mod T) < T``), and the value is rounded half up to an int.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["KINDS", "max_length_at", "stage_at", "stage_starts"]

KINDS: tuple[str, ...] = ("constant", "stair", "cosine", "stair_cosine")


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def max_length_at(step: int, *, kind: str, l_min: int, l_max: int, period: int) -> int:
    """Maximum rollout length at training step ``step`` (see the module docstring for formulas).

    Args:
        step: training step ``t >= 0``.
        kind: one of ``KINDS``.
        l_min: the lower length ``L_min >= 1``.
        l_max: the upper length ``L_max >= L_min``.
        period: the cycle length ``T >= 1`` in steps.

    Raises:
        ValueError: an unknown kind or an invalid argument (named in the message).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown schedule kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if l_min < 1:
        raise ValueError(f"l_min must be >= 1, got {l_min}")
    if l_min > l_max:
        raise ValueError(f"l_min must be <= l_max, got l_min={l_min} > l_max={l_max}")
    if period < 1:
        raise ValueError(f"period must be >= 1, got {period}")

    if kind == "constant":
        return l_max

    r = step % period  # position in the cycle; phi = 2 pi r / T
    if kind == "stair":
        return l_min if 2 * r < period else l_max

    mid = (l_max + l_min) / 2.0
    amp = (l_max - l_min) / 2.0
    phi = 2.0 * math.pi * r / period
    if kind == "cosine":
        return _round_half_up(mid + amp * math.cos(phi))

    # stair_cosine; eighths of the cycle: phi = k pi / 4  <=>  8 r = k T
    eighths = 8 * r
    if eighths < period or eighths >= 7 * period:
        return l_max
    if eighths < 3 * period:
        return _round_half_up(mid + amp * math.cos(2.0 * (phi - math.pi / 4)))
    if eighths < 5 * period:
        return l_min
    return _round_half_up(mid + amp * math.cos(2.0 * (phi - 3.0 * math.pi / 4)))


def stage_starts(stage_steps: Sequence[int]) -> list[int]:
    """The 0-based training step at which each stage starts, for stages of ``stage_steps`` steps each."""
    if not stage_steps or any(steps < 1 for steps in stage_steps):
        raise ValueError(f"stages need at least one stage and at least 1 step each, got {list(stage_steps)}")
    starts, step = [], 0
    for steps in stage_steps:
        starts.append(step)
        step += steps
    return starts


def stage_at(step: int, stage_steps: Sequence[int]) -> int:
    """The index of the stage that 0-based training step ``step`` is in.

    Raises:
        ValueError: a negative step, or one past the last stage.
    """
    starts = stage_starts(stage_steps)
    if not 0 <= step < starts[-1] + stage_steps[-1]:
        raise ValueError(f"step {step} is outside the stages (steps 0-{starts[-1] + stage_steps[-1] - 1})")
    return sum(start <= step for start in starts) - 1
