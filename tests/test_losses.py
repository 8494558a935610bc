"""Tests for crisp.losses: divergences checked against hand computations, gradients against
analytic formulas, chunking against the unchunked computation, and the GRPO surrogate by hand."""

from __future__ import annotations

import math

import pytest
import torch

from crisp.losses import (
    DIVERGENCE_KINDS,
    DivergenceSpec,
    clipped_surrogate_loss,
    divergence_sum,
    per_token_divergence,
)

# A 3-word vocabulary with explicit probabilities; logits = log p (log_softmax(log p) = log p).
P_S = [0.5, 0.3, 0.2]
P_T = [0.2, 0.5, 0.3]


def _logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in probs]], dtype=torch.float64)  # (1, 3)


def _kl_by_hand(p: list[float], q: list[float]) -> float:
    total = 0.0
    for pv, qv in zip(p, q):
        total += pv * math.log(pv / qv)
    return total


def _div(kind: str, **options) -> float:
    return float(per_token_divergence(_logits(P_S), _logits(P_T), kind=kind, **options)[0])


# ----------------------------------------------------------------------------- hand values


def test_reverse_kl_by_hand():
    expected = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.5) + 0.2 * math.log(0.2 / 0.3)
    assert _div("reverse_kl") == pytest.approx(expected, abs=1e-6)


def test_forward_kl_by_hand():
    expected = 0.2 * math.log(0.2 / 0.5) + 0.5 * math.log(0.5 / 0.3) + 0.3 * math.log(0.3 / 0.2)
    assert _div("forward_kl") == pytest.approx(expected, abs=1e-6)


def test_jsd_by_hand():
    beta = 0.3
    m = [beta * t + (1 - beta) * s for s, t in zip(P_S, P_T)]  # [0.41, 0.36, 0.23]
    assert m == pytest.approx([0.41, 0.36, 0.23])
    expected = 0.0
    for s, t, mv in zip(P_S, P_T, m):
        expected += beta * t * math.log(t / mv) + (1 - beta) * s * math.log(s / mv)
    assert _div("jsd", beta=beta) == pytest.approx(expected, abs=1e-6)
    assert expected > 0


def test_mixed_by_hand():
    reverse = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.5) + 0.2 * math.log(0.2 / 0.3)
    forward = 0.2 * math.log(0.2 / 0.5) + 0.5 * math.log(0.5 / 0.3) + 0.3 * math.log(0.3 / 0.2)
    assert _div("mixed", forward_weight=0.25) == pytest.approx(reverse + 0.25 * forward, abs=1e-6)


def test_sampled_token_value_by_hand():
    tokens = torch.tensor([1])
    value = _div("sampled_token", tokens=tokens)
    expected = -(math.log(0.5) - math.log(0.3)) * math.log(0.3)
    assert value == pytest.approx(expected, abs=1e-6)


def test_term_clip_by_hand():
    # reverse-KL terms: 0.5 ln 2.5 = 0.458, 0.3 ln 0.6 = -0.153, 0.2 ln(2/3) = -0.081
    terms = [0.5 * math.log(0.5 / 0.2), 0.3 * math.log(0.3 / 0.5), 0.2 * math.log(0.2 / 0.3)]
    expected = min(terms[0], 0.1) + min(terms[1], 0.1) + min(terms[2], 0.1)
    assert expected == pytest.approx(0.1 + terms[1] + terms[2])
    assert _div("reverse_kl", term_clip=0.1) == pytest.approx(expected, abs=1e-6)
    # forward-KL terms: 0.2 ln 0.4 = -0.183, 0.5 ln(5/3) = 0.255, 0.3 ln 1.5 = 0.122
    fterms = [0.2 * math.log(0.2 / 0.5), 0.5 * math.log(0.5 / 0.3), 0.3 * math.log(0.3 / 0.2)]
    expected_f = fterms[0] + 0.05 + 0.05
    assert _div("forward_kl", term_clip=0.05) == pytest.approx(expected_f, abs=1e-6)


def test_term_clip_zeroes_the_gradient_of_clipped_terms():
    student = _logits(P_S).requires_grad_(True)
    # clip below every term: the value is constant and there is no gradient
    value = per_token_divergence(student, _logits(P_T), kind="reverse_kl", term_clip=-1.0)
    assert float(value[0].detach()) == pytest.approx(-3.0)
    value.sum().backward()
    assert torch.all(student.grad == 0)


def test_teacher_top_k_by_hand():
    p_s = [0.4, 0.1, 0.3, 0.2]
    p_t = [0.1, 0.5, 0.15, 0.25]
    # teacher top-2 = ids 1 and 3; renormalise both distributions over {1, 3}
    s1, s3 = 0.1 / 0.3, 0.2 / 0.3
    t1, t3 = 0.5 / 0.75, 0.25 / 0.75
    reverse = s1 * math.log(s1 / t1) + s3 * math.log(s3 / t3)
    forward = t1 * math.log(t1 / s1) + t3 * math.log(t3 / s3)
    student = torch.tensor([[math.log(p) for p in p_s]], dtype=torch.float64)
    teacher = torch.tensor([[math.log(p) for p in p_t]], dtype=torch.float64)
    got_r = per_token_divergence(student, teacher, kind="reverse_kl", teacher_top_k=2)
    got_f = per_token_divergence(student, teacher, kind="forward_kl", teacher_top_k=2)
    assert float(got_r[0]) == pytest.approx(reverse, abs=1e-6)
    assert float(got_f[0]) == pytest.approx(forward, abs=1e-6)
    # k = V is the full vocabulary
    full = per_token_divergence(student, teacher, kind="reverse_kl")
    assert torch.allclose(per_token_divergence(student, teacher, kind="reverse_kl", teacher_top_k=4), full)


# ----------------------------------------------------------------------------- properties


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd", "mixed"])
def test_divergence_non_negative_on_random_logits(kind):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(64, 11, generator=g) * 3
    teacher = torch.randn(64, 11, generator=g) * 3
    values = per_token_divergence(student, teacher, kind=kind, beta=0.4)
    assert values.shape == (64,)
    assert torch.all(values >= -1e-6)
    assert torch.all(values > 0)  # distinct random distributions


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd", "mixed"])
def test_divergence_zero_when_teacher_equals_student(kind):
    logits = torch.randn(8, 13, generator=torch.Generator().manual_seed(1))
    values = per_token_divergence(logits, logits.clone(), kind=kind)
    assert torch.allclose(values, torch.zeros(8), atol=1e-6)


def test_jsd_endpoints_equal_the_kls():
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(5, 9, generator=g), torch.randn(5, 9, generator=g)
    forward = per_token_divergence(student, teacher, kind="forward_kl")
    reverse = per_token_divergence(student, teacher, kind="reverse_kl")
    assert torch.allclose(per_token_divergence(student, teacher, kind="jsd", beta=0.0), forward)
    assert torch.allclose(per_token_divergence(student, teacher, kind="jsd", beta=1.0), reverse)
    # near the ends the JSD scales like beta * forward and (1 - beta) * reverse
    small = per_token_divergence(student.double(), teacher.double(), kind="jsd", beta=1e-4)
    assert torch.allclose(small / 1e-4, forward.double(), rtol=1e-2)
    large = per_token_divergence(student.double(), teacher.double(), kind="jsd", beta=1 - 1e-4)
    assert torch.allclose(large / 1e-4, reverse.double(), rtol=1e-2)


def test_reverse_kl_gradient_matches_analytic():
    g = torch.Generator().manual_seed(3)
    student = torch.randn(4, 7, generator=g, dtype=torch.float64).requires_grad_(True)
    teacher = torch.randn(4, 7, generator=g, dtype=torch.float64).requires_grad_(True)
    kl = per_token_divergence(student, teacher, kind="reverse_kl")
    kl.sum().backward()
    log_s = torch.log_softmax(student.detach(), -1)
    log_t = torch.log_softmax(teacher.detach(), -1)
    for row in range(4):
        p = log_s[row].exp()
        kl_row = float((p * (log_s[row] - log_t[row])).sum())
        analytic = p * (log_s[row] - log_t[row] - kl_row)
        assert torch.allclose(student.grad[row].double(), analytic, atol=1e-6)
    assert teacher.grad is None  # teacher is a constant


def test_sampled_token_gradient_is_reinforce():
    g = torch.Generator().manual_seed(4)
    student = torch.randn(6, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    teacher = torch.randn(6, 5, generator=g, dtype=torch.float64)
    tokens = torch.tensor([0, 4, 2, 2, 1, 3])
    per_token_divergence(student, teacher, kind="sampled_token", tokens=tokens).sum().backward()
    log_s = torch.log_softmax(student.detach(), -1)
    log_t = torch.log_softmax(teacher, -1)
    for row in range(6):
        y = int(tokens[row])
        advantage = float(log_t[row, y] - log_s[row, y])
        d_log_s_y = -log_s[row].exp()  # d log p_S(y) / d z = onehot(y) - p_S
        d_log_s_y[y] += 1.0
        assert torch.allclose(student.grad[row], -advantage * d_log_s_y, atol=1e-9)


def test_low_precision_inputs_are_computed_in_fp32():
    g = torch.Generator().manual_seed(5)
    student = torch.randn(3, 50, generator=g).bfloat16()
    teacher = torch.randn(3, 50, generator=g).bfloat16()
    values = per_token_divergence(student, teacher, kind="reverse_kl")
    assert values.dtype == torch.float32
    expected = per_token_divergence(student.double(), teacher.double(), kind="reverse_kl")
    assert torch.allclose(values.double(), expected, atol=1e-5)


def test_zero_probability_entries_give_finite_values_and_gradients():
    student = torch.tensor([[0.0, 1.0, -1.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, float("-inf"), 0.0]])  # p_T = [0.5, 0, 0.5]
    forward = per_token_divergence(student, teacher, kind="forward_kl")
    log_s = torch.log_softmax(student.detach(), -1)
    expected = 0.5 * (math.log(0.5) - float(log_s[0, 0])) + 0.5 * (math.log(0.5) - float(log_s[0, 2]))
    assert float(forward[0].detach()) == pytest.approx(expected, abs=1e-5)
    forward.sum().backward()
    assert torch.isfinite(student.grad).all()


def test_errors():
    s, t = torch.zeros(2, 3), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="reverse_kl.*forward_kl.*jsd.*mixed.*sampled_token"):
        per_token_divergence(s, t, kind="kl")
    with pytest.raises(ValueError, match="tokens"):
        per_token_divergence(s, t, kind="sampled_token")
    with pytest.raises(ValueError, match="beta"):
        per_token_divergence(s, t, kind="jsd", beta=1.5)
    with pytest.raises(ValueError, match="teacher_top_k"):
        per_token_divergence(s, t, kind="reverse_kl", teacher_top_k=4)
    with pytest.raises(ValueError, match="shape"):
        per_token_divergence(s, torch.zeros(2, 4), kind="reverse_kl")


# ----------------------------------------------------------------------------- chunking


def _heads(seed: int, hidden: int = 6, vocab: int = 17):
    torch.manual_seed(seed)
    student_head = torch.nn.Linear(hidden, vocab, dtype=torch.float64)
    teacher_head = torch.nn.Linear(hidden, vocab, dtype=torch.float64)
    return student_head, teacher_head


CHUNK_CASES = [
    {"kind": "reverse_kl"},
    {"kind": "forward_kl"},
    {"kind": "mixed", "forward_weight": 0.7},
    {"kind": "jsd", "beta": 0.3, "term_clip": 0.2},
    {"kind": "reverse_kl", "teacher_top_k": 5},
    {"kind": "sampled_token"},
]


def _full_sum(student_head, teacher_head, student_hidden, teacher_hidden, tokens, options):
    """The reference: full (N, V) logits, per_token_divergence, summed, with autograd."""
    h_full = student_hidden.clone().requires_grad_(True)
    full = per_token_divergence(student_head(h_full), teacher_head(teacher_hidden), tokens=tokens, **options)
    full.sum().backward()
    grads = (h_full.grad.clone(), student_head.weight.grad.clone(), student_head.bias.grad.clone())
    student_head.zero_grad(set_to_none=True)
    return full.detach(), grads


def _fused_sum(student_head, teacher_head, student_hidden, teacher_hidden, tokens, options, chunk_size):
    h = student_hidden.clone().requires_grad_(True)
    total, per_token = divergence_sum(
        h,
        student_head.weight,
        teacher_hidden,
        teacher_head.weight,
        DivergenceSpec(**options),
        student_bias=student_head.bias,
        teacher_bias=teacher_head.bias,
        chunk_size=chunk_size,
        tokens=tokens,
    )
    total.backward()
    return total, per_token, h.grad


@pytest.mark.parametrize("options", CHUNK_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 10, 128])
def test_divergence_sum_equals_the_full_logits_computation(options, chunk_size):
    student_head, teacher_head = _heads(6)
    g = torch.Generator().manual_seed(7)
    n = 10
    student_hidden = torch.randn(n, 6, generator=g, dtype=torch.float64)
    teacher_hidden = torch.randn(n, 6, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 17, (n,), generator=g) if options["kind"] == "sampled_token" else None
    full, (grad_h, grad_w, grad_b) = _full_sum(
        student_head, teacher_head, student_hidden, teacher_hidden, tokens, options
    )

    total, per_token, h_grad = _fused_sum(
        student_head, teacher_head, student_hidden, teacher_hidden, tokens, options, chunk_size
    )
    assert per_token.shape == (n,) and not per_token.requires_grad
    assert torch.allclose(per_token, full, atol=1e-10)
    assert torch.allclose(total, full.sum(), atol=1e-10)
    assert grad_w.abs().max() > 1e-3  # the comparisons below are not 0 == 0
    assert torch.allclose(h_grad, grad_h, atol=1e-10)
    assert torch.allclose(student_head.weight.grad, grad_w, atol=1e-10)
    assert torch.allclose(student_head.bias.grad, grad_b, atol=1e-10)
    assert teacher_head.weight.grad is None and teacher_head.bias.grad is None


def test_divergence_sum_scales_with_the_upstream_gradient_and_accumulates():
    """(total / k).backward() gives 1/k of the gradient, added to what .grad already holds."""
    student_head, teacher_head = _heads(11)
    hidden = torch.randn(9, 6, dtype=torch.float64)
    _, (_, grad_w, _) = _full_sum(student_head, teacher_head, hidden, hidden.flip(0), None, {"kind": "reverse_kl"})
    student_head.weight.grad = torch.ones_like(student_head.weight)
    total, _ = divergence_sum(
        hidden,
        student_head.weight,
        hidden.flip(0),
        teacher_head.weight,
        DivergenceSpec(),
        student_bias=student_head.bias,
        teacher_bias=teacher_head.bias,
        chunk_size=4,
    )
    (total / 4.0).backward()
    assert torch.allclose(student_head.weight.grad, 1.0 + grad_w / 4.0, atol=1e-12)


def test_divergence_sum_keeps_no_logits_for_backward():
    vocab, chunk, hidden_size, n = 1000, 16, 8, 64
    student_head, teacher_head = torch.nn.Linear(hidden_size, vocab), torch.nn.Linear(hidden_size, vocab)
    hidden = torch.randn(n, hidden_size, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        full = per_token_divergence(student_head(hidden), teacher_head(hidden), kind="reverse_kl")
    assert max(saved) >= n * vocab  # the unchunked graph holds (N, V) tensors
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        total, per_token = divergence_sum(
            hidden,
            student_head.weight,
            hidden,
            teacher_head.weight,
            DivergenceSpec(),
            student_bias=student_head.bias,
            teacher_bias=teacher_head.bias,
            chunk_size=chunk,
        )
    # only the gradients themselves are kept: (N, H), (V, H) and (V,), never a (chunk, V) block
    assert sorted(saved) == sorted([n * hidden_size, vocab * hidden_size, vocab])
    assert torch.allclose(per_token, full.detach(), atol=1e-6)


def test_divergence_sum_with_one_shared_head_gives_no_teacher_gradient():
    """A live teacher passes the student's own head: the teacher side stays a constant."""
    head, _ = _heads(8)
    g = torch.Generator().manual_seed(9)
    student_hidden = torch.randn(7, 6, generator=g, dtype=torch.float64)
    teacher_hidden = torch.randn(7, 6, generator=g, dtype=torch.float64)
    for kind in ("reverse_kl", "jsd"):
        full = per_token_divergence(head(student_hidden), head(teacher_hidden).detach(), kind=kind)
        full.sum().backward()
        grad_full = head.weight.grad.clone()
        head.zero_grad(set_to_none=True)
        total, _ = divergence_sum(
            student_hidden,
            head.weight,
            teacher_hidden,
            head.weight,
            DivergenceSpec(kind=kind),
            student_bias=head.bias,
            teacher_bias=head.bias,
            chunk_size=3,
        )
        total.backward()
        assert torch.allclose(total, full.sum())
        assert torch.allclose(head.weight.grad, grad_full, atol=1e-10), kind
        head.zero_grad(set_to_none=True)


def test_divergence_sum_low_precision_inputs():
    """bf16 hidden states and head: fp32 values, gradients in the inputs' dtype, close to fp32."""
    student_head, teacher_head = _heads(12, hidden=8, vocab=50)
    hidden = torch.randn(6, 8, dtype=torch.float64)
    full, (grad_h, grad_w, _) = _full_sum(student_head, teacher_head, hidden, hidden.flip(0), None, {"kind": "mixed"})
    weight = student_head.weight.detach().bfloat16().requires_grad_(True)
    h = hidden.bfloat16().requires_grad_(True)
    total, per_token = divergence_sum(
        h,
        weight,
        hidden.flip(0).bfloat16(),
        teacher_head.weight.bfloat16(),
        DivergenceSpec(kind="mixed"),
        student_bias=student_head.bias.bfloat16(),
        teacher_bias=teacher_head.bias.bfloat16(),
        chunk_size=4,
    )
    total.backward()
    assert per_token.dtype == torch.float32 and h.grad.dtype == weight.grad.dtype == torch.bfloat16
    assert torch.allclose(per_token.double(), full, rtol=0.05, atol=1e-3)
    assert torch.allclose(weight.grad.double(), grad_w, rtol=0.05, atol=2e-3)
    assert torch.allclose(h.grad.double(), grad_h, rtol=0.05, atol=2e-3)


def test_divergence_sum_without_grad_and_empty():
    student_head, teacher_head = _heads(10)
    hidden = torch.randn(5, 6, dtype=torch.float64)
    expected = per_token_divergence(student_head(hidden), teacher_head(hidden), kind="forward_kl").detach()
    for grad_mode in (torch.no_grad, torch.inference_mode):
        with grad_mode():
            total, per_token = divergence_sum(
                hidden,
                student_head.weight,
                hidden,
                teacher_head.weight,
                DivergenceSpec(kind="forward_kl"),
                student_bias=student_head.bias,
                teacher_bias=teacher_head.bias,
                chunk_size=2,
            )
        assert torch.allclose(per_token, expected) and torch.allclose(total, expected.sum())
        assert not total.requires_grad
    total, per_token = divergence_sum(
        hidden[:0], student_head.weight, hidden[:0], teacher_head.weight, DivergenceSpec()
    )
    assert per_token.shape == (0,) and total.item() == 0.0


def test_divergence_sum_errors():
    head, _ = _heads(13)
    hidden = torch.randn(5, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="chunk_size"):
        divergence_sum(hidden, head.weight, hidden, head.weight, DivergenceSpec(), chunk_size=0)
    with pytest.raises(ValueError, match="rows"):
        divergence_sum(hidden, head.weight, hidden[:4], head.weight, DivergenceSpec())
    with pytest.raises(ValueError, match="tokens"):
        divergence_sum(
            hidden, head.weight, hidden, head.weight, DivergenceSpec(kind="sampled_token"), tokens=torch.zeros(3).long()
        )
    # the spec refuses what per_token_divergence refuses, for the closed-form kinds too (they never call it)
    with pytest.raises(ValueError, match="unknown divergence kind"):
        DivergenceSpec(kind="kl")
    with pytest.raises(ValueError, match="forward_weight"):
        DivergenceSpec(kind="mixed", forward_weight=-1.0)


# ----------------------------------------------------------------------------- GRPO surrogate


def _surrogate_batch():
    # Sequence 0 (A = +1): ratios 1.5 (high clip active), 1.1, 0.5 (low side, A > 0: not clipped).
    # Sequence 1 (A = -1): ratios 0.5 (low clip active), 1.5 (A < 0: not clipped), then padding.
    ratios = [[1.5, 1.1, 0.5], [0.5, 1.5, 1.0]]
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, float("-inf")]], dtype=torch.float64)
    log_ratio = torch.tensor([[math.log(r) for r in row] for row in ratios], dtype=torch.float64)
    logprobs = old + log_ratio
    logprobs[1, 2] = float("-inf")  # padding garbage must not leak
    mask = torch.tensor([[True, True, True], [True, True, False]])
    advantages = torch.tensor([1.0, -1.0], dtype=torch.float64)
    return logprobs, old, advantages, mask


def test_surrogate_token_aggregation_by_hand():
    logprobs, old, advantages, mask = _surrogate_batch()
    logprobs.requires_grad_(True)
    loss, stats = clipped_surrogate_loss(logprobs, old, advantages, mask, eps_low=0.2, eps_high=0.28)
    # per-token objectives: seq0: min(1.5, 1.28)=1.28, 1.1, min(0.5, 0.8)=0.5
    #                       seq1: min(-0.5, -0.8)=-0.8, min(-1.5, -1.28)=-1.5
    objectives = [1.28, 1.1, 0.5, -0.8, -1.5]
    assert loss.item() == pytest.approx(-sum(objectives) / 5, abs=1e-9)
    assert stats["clip_frac_high"] == pytest.approx(1 / 5)
    assert stats["clip_frac_low"] == pytest.approx(1 / 5)
    assert stats["ratio_mean"] == pytest.approx((1.5 + 1.1 + 0.5 + 0.5 + 1.5) / 5)
    loss.backward()
    # d loss / d logp = -A * ratio / 5 where the unclipped branch is active, 0 where clipped
    expected = torch.tensor([[0.0, -1.1 / 5, -0.5 / 5], [0.0, 1.5 / 5, 0.0]], dtype=torch.float64)
    assert torch.allclose(logprobs.grad, expected, atol=1e-9)


def test_surrogate_sequence_aggregation_differs_by_hand():
    logprobs, old, advantages, mask = _surrogate_batch()
    token_loss, _ = clipped_surrogate_loss(logprobs, old, advantages, mask, aggregation="token")
    seq_loss, _ = clipped_surrogate_loss(logprobs, old, advantages, mask, aggregation="sequence")
    seq0 = (1.28 + 1.1 + 0.5) / 3
    seq1 = (-0.8 - 1.5) / 2
    assert float(seq_loss) == pytest.approx(-(seq0 + seq1) / 2, abs=1e-9)  # 0.095
    assert float(token_loss) == pytest.approx(-0.58 / 5, abs=1e-9)  # -0.116
    assert float(seq_loss) != pytest.approx(float(token_loss))


def test_surrogate_constant_normaliser():
    logprobs, old, advantages, mask = _surrogate_batch()
    default, _ = clipped_surrogate_loss(logprobs, old, advantages, mask)
    constant, _ = clipped_surrogate_loss(logprobs, old, advantages, mask, normaliser=20.0)
    assert float(constant) == pytest.approx(-0.58 / 20, abs=1e-9)
    assert float(constant) == pytest.approx(float(default) * 5 / 20, abs=1e-9)


def test_surrogate_k3_kl_by_hand():
    logprobs, old, advantages, mask = _surrogate_batch()
    ref = torch.full_like(logprobs, -1.0)
    loss, stats = clipped_surrogate_loss(logprobs, old, advantages, mask, kl_coef=0.1, ref_logprobs=ref)
    k3 = []
    for i in range(2):
        for t in range(3):
            if mask[i, t]:
                d = -1.0 - float(logprobs[i, t])
                k3.append(math.exp(d) - d - 1.0)
    assert all(v >= 0 for v in k3)
    expected = (-0.58 + 0.1 * sum(k3)) / 5
    assert float(loss) == pytest.approx(expected, abs=1e-9)
    assert stats["kl"] == pytest.approx(sum(k3) / 5, abs=1e-9)


def test_surrogate_errors():
    logprobs, old, advantages, mask = _surrogate_batch()
    with pytest.raises(ValueError, match="ref_logprobs"):
        clipped_surrogate_loss(logprobs, old, advantages, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="normaliser"):
        clipped_surrogate_loss(logprobs, old, advantages, mask, aggregation="sequence", normaliser=4.0)
    with pytest.raises(ValueError, match="aggregation"):
        clipped_surrogate_loss(logprobs, old, advantages, mask, aggregation="batch")


def test_all_kinds_listed():
    assert set(DIVERGENCE_KINDS) == {"reverse_kl", "forward_kl", "jsd", "mixed", "sampled_token"}
