"""Tests for crisp.schedules: SIRI length schedules at the phase boundaries and inside each phase."""

from __future__ import annotations

import math

import pytest

from crisp.schedules import KINDS, max_length_at, stage_at, stage_starts

L_MIN, L_MAX, T = 8192, 16384, 640  # the SIRI paper's settings
MID, AMP = 12288, 4096
DIAG = round(AMP * math.cos(math.pi / 4))  # 2896


def _at(step: int, kind: str) -> int:
    return max_length_at(step, kind=kind, l_min=L_MIN, l_max=L_MAX, period=T)


BOUNDARIES = [0, T // 8, T // 4, 3 * T // 8, T // 2, 5 * T // 8, 3 * T // 4, 7 * T // 8, T]


def test_constant():
    assert [_at(t, "constant") for t in BOUNDARIES + [1, 333, 10_000]] == [L_MAX] * 12


def test_stair_compresses_first_then_expands():
    expected = [L_MIN, L_MIN, L_MIN, L_MIN, L_MAX, L_MAX, L_MAX, L_MAX, L_MIN]
    assert [_at(t, "stair") for t in BOUNDARIES] == expected
    assert _at(T // 2 - 1, "stair") == L_MIN
    assert _at(T - 1, "stair") == L_MAX


def test_cosine_at_boundaries():
    expected = [
        L_MAX,  # cos 0
        MID + DIAG,  # cos pi/4
        MID,  # cos pi/2
        MID - DIAG,  # cos 3pi/4
        L_MIN,  # cos pi
        MID - DIAG,
        MID,
        MID + DIAG,
        L_MAX,
    ]
    assert [_at(t, "cosine") for t in BOUNDARIES] == expected


def test_stair_cosine_at_boundaries():
    expected = [
        L_MAX,  # phi = 0: plateau at L_max
        L_MAX,  # phi = pi/4: descent starts at cos(0)
        MID,  # phi = pi/2: cos(pi/2)
        L_MIN,  # phi = 3pi/4: plateau at L_min starts
        L_MIN,  # phi = pi
        L_MIN,  # phi = 5pi/4: ascent starts at cos(pi) = -1
        MID,  # phi = 3pi/2: cos(3pi/2) = 0
        L_MAX,  # phi = 7pi/4: plateau at L_max
        L_MAX,  # phi = 2pi = 0 of the next cycle
    ]
    assert [_at(t, "stair_cosine") for t in BOUNDARIES] == expected


def test_stair_cosine_inside_each_phase():
    # midpoints of the eight eighths of the cycle
    assert _at(T // 16, "stair_cosine") == L_MAX
    assert _at(3 * T // 16, "stair_cosine") == MID + DIAG  # cos(2 (3pi/8 - pi/4)) = cos(pi/4)
    assert _at(5 * T // 16, "stair_cosine") == MID - DIAG  # cos(2 (5pi/8 - pi/4)) = cos(3pi/4)
    assert _at(7 * T // 16, "stair_cosine") == L_MIN
    assert _at(9 * T // 16, "stair_cosine") == L_MIN
    assert _at(11 * T // 16, "stair_cosine") == MID - DIAG  # cos(2 (11pi/8 - 3pi/4)) = cos(5pi/4)
    assert _at(13 * T // 16, "stair_cosine") == MID + DIAG  # cos(2 (13pi/8 - 3pi/4)) = cos(7pi/4)
    assert _at(15 * T // 16, "stair_cosine") == L_MAX


def _paper_stair_cosine(t: int) -> float:
    phi = 2 * math.pi * (t % T) / T
    if phi < math.pi / 4 or phi >= 7 * math.pi / 4:
        return L_MAX
    if phi < 3 * math.pi / 4:
        return MID + AMP * math.cos(2 * (phi - math.pi / 4))
    if phi < 5 * math.pi / 4:
        return L_MIN
    return MID + AMP * math.cos(2 * (phi - 3 * math.pi / 4))


@pytest.mark.parametrize("t", [1, 37, 81, 99, 159, 161, 239, 241, 319, 401, 479, 481, 559, 561, 639, 1234])
def test_against_the_formulas(t):
    assert abs(_at(t, "cosine") - (MID + AMP * math.cos(2 * math.pi * t / T))) <= 0.5
    assert abs(_at(t, "stair_cosine") - _paper_stair_cosine(t)) <= 0.5


@pytest.mark.parametrize("kind", ["cosine", "stair_cosine"])
def test_continuity(kind):
    values = [_at(t, kind) for t in range(3 * T + 1)]
    # the largest slope of either curve is 2 * AMP * 2pi / T per step (stair_cosine's is 2x cosine's)
    max_step = 2 * AMP * 2 * math.pi / T + 1
    assert max(abs(b - a) for a, b in zip(values, values[1:])) <= max_step
    assert min(values) == L_MIN and max(values) == L_MAX


@pytest.mark.parametrize("kind", KINDS)
def test_periodicity_and_range(kind):
    for t in range(0, T, 7):
        value = _at(t, kind)
        assert L_MIN <= value <= L_MAX
        assert isinstance(value, int)
        assert value == _at(t + T, kind) == _at(t + 5 * T, kind)


def test_odd_period_and_equal_bounds():
    # T = 7 does not divide into eighths; still valid and periodic
    values = [max_length_at(t, kind="stair_cosine", l_min=100, l_max=200, period=7) for t in range(14)]
    assert values[:7] == values[7:]
    assert values[0] == 200
    assert max_length_at(3, kind="cosine", l_min=512, l_max=512, period=10) == 512
    assert max_length_at(0, kind="stair", l_min=5, l_max=9, period=1) == 5


def test_validation_errors():
    with pytest.raises(ValueError, match="l_min"):
        max_length_at(0, kind="cosine", l_min=200, l_max=100, period=10)
    with pytest.raises(ValueError, match="period"):
        max_length_at(0, kind="cosine", l_min=100, l_max=200, period=0)
    with pytest.raises(ValueError, match="step"):
        max_length_at(-1, kind="cosine", l_min=100, l_max=200, period=10)
    with pytest.raises(ValueError, match="constant.*stair.*cosine.*stair_cosine"):
        max_length_at(0, kind="linear", l_min=100, l_max=200, period=10)


# ---------------------------------------------------------------------------------------------
# TFPI's stages
# ---------------------------------------------------------------------------------------------

TFPI_STEPS = [100, 100, 100]  # e.g. 4K -> 8K -> 16K, 100 steps each


def test_stage_starts_are_the_running_sums():
    assert stage_starts(TFPI_STEPS) == [0, 100, 200]
    assert stage_starts([5]) == [0]
    assert stage_starts([1, 2, 3]) == [0, 1, 3]


def test_stage_at_every_step_and_the_boundaries():
    stages = [stage_at(t, TFPI_STEPS) for t in range(300)]
    assert stages == [0] * 100 + [1] * 100 + [2] * 100
    assert [stage_at(t, [1, 2, 3]) for t in range(6)] == [0, 1, 1, 2, 2, 2]


def test_stage_errors():
    with pytest.raises(ValueError, match="outside the stages"):
        stage_at(300, TFPI_STEPS)
    with pytest.raises(ValueError, match="outside the stages"):
        stage_at(-1, TFPI_STEPS)
    with pytest.raises(ValueError, match="at least 1 step"):
        stage_starts([100, 0])
    with pytest.raises(ValueError, match="at least one stage"):
        stage_at(0, [])
