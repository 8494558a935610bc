"""Loss functions: per-token divergences for self-distillation and the GRPO clipped surrogate.

Pure tensor math: no I/O, no model classes.

Conventions used throughout this module
---------------------------------------
* ``p_S`` is the student distribution, ``p_T`` the teacher distribution, both obtained with a
  ``log_softmax`` over the last (vocabulary) dimension computed in fp32 whatever the input dtype
  (bf16/fp16 are upcast; fp64 inputs stay fp64, which only adds precision).
* The teacher side is always a constant: its logits are detached, so no gradient reaches it.
* ``KL(p || q) = sum_v p(v) * (log p(v) - log q(v))``.
  "reverse KL" is ``KL(p_S || p_T)`` (CRISP), "forward KL" is ``KL(p_T || p_S)``.
* Divergences are returned per token, shape ``(N,)``; reduction over tokens is the caller's job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DIVERGENCE_KINDS",
    "AGGREGATIONS",
    "DivergenceSpec",
    "SurrogateSpec",
    "per_token_divergence",
    "divergence_sum",
    "clipped_surrogate_loss",
]

DIVERGENCE_KINDS: tuple[str, ...] = ("reverse_kl", "forward_kl", "jsd", "mixed", "sampled_token")
AGGREGATIONS: tuple[str, ...] = ("token", "sequence")


def _upcast(x: Tensor) -> Tensor:
    """``x`` in fp32, or fp64 if it already is fp64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _log_probs(logits: Tensor) -> Tensor:
    """log_softmax in (at least) fp32 over the last dimension.

    -inf (an exact zero probability) is replaced by the most negative finite float so that its
    term is 0 * finite = 0 instead of 0 * inf = nan, in the value and in the gradient.
    """
    logits = _upcast(logits)
    return F.log_softmax(logits, dim=-1).clamp(min=torch.finfo(logits.dtype).min)  # (N, V)


def _kl_terms(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Elementwise terms p(v) * (log p(v) - log q(v)) of KL(p || q); summing over v gives the KL."""
    return log_p.exp() * (log_p - log_q)  # (N, V)


def _divergence_terms(log_s: Tensor, log_t: Tensor, *, kind: str, beta: float, forward_weight: float) -> Tensor:
    """Per-(token, vocab) terms whose sum over the vocabulary is the requested divergence."""
    if kind == "reverse_kl":
        return _kl_terms(log_s, log_t)  # (N, V)
    if kind == "forward_kl":
        return _kl_terms(log_t, log_s)  # (N, V)
    if kind == "mixed":
        return _kl_terms(log_s, log_t) + forward_weight * _kl_terms(log_t, log_s)  # (N, V)
    # kind == "jsd"
    if beta == 0.0:
        return _kl_terms(log_t, log_s)  # (N, V) forward KL
    if beta == 1.0:
        return _kl_terms(log_s, log_t)  # (N, V) reverse KL
    # log M = log(beta * p_T + (1 - beta) * p_S), computed in log space for stability.
    log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log1p(-beta)]), dim=0)  # (N, V)
    return beta * _kl_terms(log_t, log_m) + (1.0 - beta) * _kl_terms(log_s, log_m)  # (N, V)


def _check_divergence(kind: str, beta: float, forward_weight: float) -> None:
    if kind not in DIVERGENCE_KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; valid kinds: {', '.join(DIVERGENCE_KINDS)}")
    if kind == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if kind == "mixed" and forward_weight < 0.0:
        raise ValueError(f"forward_weight must be >= 0, got {forward_weight}")


@dataclass(frozen=True)
class DivergenceSpec:
    """Which divergence a self-distillation loss computes, and its options (see per_token_divergence)."""

    kind: str = "reverse_kl"
    beta: float = 0.5  # jsd only
    forward_weight: float = 0.5  # mixed only
    term_clip: float | None = None
    teacher_top_k: int | None = None

    def __post_init__(self):
        _check_divergence(self.kind, self.beta, self.forward_weight)

    @property
    def closed_form(self) -> bool:
        """Whether the gradient has a closed form (no per-term clip or top-k support to differentiate)."""
        return (
            self.kind in ("reverse_kl", "forward_kl", "mixed") and self.term_clip is None and self.teacher_top_k is None
        )


@dataclass(frozen=True)
class SurrogateSpec:
    """The settings of clipped_surrogate_loss that a GRPO run fixes."""

    eps_low: float = 0.2
    eps_high: float = 0.28
    aggregation: str = "token"
    kl_coef: float = 0.0


def per_token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    kind: str,
    beta: float = 0.5,
    forward_weight: float = 0.5,
    term_clip: float | None = None,
    teacher_top_k: int | None = None,
    tokens: Tensor | None = None,
) -> Tensor:
    """Divergence between student and teacher next-token distributions, one value per position.

    Args:
        student_logits: ``(N, V)`` student logits (any float dtype; computed in fp32).
        teacher_logits: ``(N, V)`` teacher logits; detached (treated as a constant).
        kind: one of ``DIVERGENCE_KINDS``:

            * ``"reverse_kl"``: ``KL(p_S || p_T) = sum_v p_S (log p_S - log p_T)`` (CRISP).
            * ``"forward_kl"``: ``KL(p_T || p_S) = sum_v p_T (log p_T - log p_S)``.
            * ``"jsd"``: generalised Jensen-Shannon divergence with weight ``beta`` (the GKD / OPSD
              convention): ``M = beta * p_T + (1 - beta) * p_S`` and
              ``JSD_beta = beta * KL(p_T || M) + (1 - beta) * KL(p_S || M)``, with ``log M``
              computed by ``logsumexp``. The two ends are defined as the KLs themselves:
              ``beta = 0`` returns forward ``KL(p_T || p_S)`` and ``beta = 1`` returns reverse
              ``KL(p_S || p_T)``. (Inside ``(0, 1)`` the formula behaves like
              ``beta * KL(p_T || p_S)`` for small ``beta`` and like ``(1 - beta) * KL(p_S || p_T)``
              for ``beta`` near 1, so its scale shrinks towards the ends; the end points are not
              its limits but the KLs it interpolates between.)
            * ``"mixed"``: ``KL(p_S || p_T) + forward_weight * KL(p_T || p_S)``; the forward term
              keeps a gradient where the student is confidently wrong and reverse KL stalls.
            * ``"sampled_token"``: needs ``tokens`` (the sampled ids ``y``). Returns the surrogate
              ``-(log p_T(y) - log p_S(y)).detach() * log p_S(y)``, whose gradient is the
              single-sample (REINFORCE-style) estimator of the reverse-KL gradient. Its *value* is
              not a divergence; ``log p_S(y) - log p_T(y)`` is the per-token reverse-KL estimate.
        beta: JSD weight in ``[0, 1]`` (only for ``"jsd"``).
        forward_weight: weight ``>= 0`` of the forward term (only for ``"mixed"``).
        term_clip: if set, every per-(token, vocab) term of the sum over the vocabulary is clamped
            to ``<= term_clip`` before summing (as OPSD's released ``jsd_token_clip``); for
            ``"mixed"`` and ``"jsd"`` the clamped term is the combined term of that vocabulary entry.
            Clamped terms get no gradient.
        teacher_top_k: if set, the sum runs only over the teacher's ``k`` most likely vocabulary
            entries at each position, and both distributions are renormalised over that support
            (``log_softmax`` of the gathered logits) before the divergence is computed.
        tokens: ``(N,)`` sampled token ids (only for ``"sampled_token"``).

    Returns:
        ``(N,)`` fp32 per-position values (fp64 for fp64 inputs).

    Raises:
        ValueError: unknown ``kind``, mismatched shapes, or an option that does not apply.
    """
    _check_divergence(kind, beta, forward_weight)
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student_logits and teacher_logits must both be (N, V) with the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    teacher_logits = teacher_logits.detach()

    if kind == "sampled_token":
        if tokens is None:
            raise ValueError("kind='sampled_token' needs tokens (the sampled ids, shape (N,))")
        if term_clip is not None or teacher_top_k is not None:
            raise ValueError("term_clip and teacher_top_k do not apply to kind='sampled_token'")
        index = tokens.long().reshape(-1, 1)  # (N, 1)
        student_logp = _log_probs(student_logits).gather(-1, index).squeeze(-1)  # (N,)
        teacher_logp = _log_probs(teacher_logits).gather(-1, index).squeeze(-1)  # (N,)
        advantage = (teacher_logp - student_logp).detach()  # (N,)
        return -advantage * student_logp  # (N,)

    student = _upcast(student_logits)  # (N, V)
    teacher = _upcast(teacher_logits)  # (N, V)
    if teacher_top_k is not None:
        vocab = teacher.shape[-1]
        if not 1 <= teacher_top_k <= vocab:
            raise ValueError(f"teacher_top_k must be in [1, {vocab}], got {teacher_top_k}")
        top_ids = teacher.topk(teacher_top_k, dim=-1).indices  # (N, k)
        student = student.gather(-1, top_ids)  # (N, k)
        teacher = teacher.gather(-1, top_ids)  # (N, k)

    terms = _divergence_terms(
        _log_probs(student), _log_probs(teacher), kind=kind, beta=beta, forward_weight=forward_weight
    )  # (N, V) or (N, k)
    if term_clip is not None:
        terms = terms.clamp(max=term_clip)
    return terms.sum(dim=-1)  # (N,)


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot products of two (n, V) tensors as one batched matmul: no (n, V) temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)  # (n,)


def _analytic_divergence(student_logits: Tensor, teacher_logits: Tensor, *, kind: str, forward_weight: float):
    """Per-token values and the gradient of their sum with respect to the student logits, in closed form.

    With ``d = log p_S - log p_T``: reverse KL ``sum p_S d`` has gradient ``p_S * (d - KL)``; forward
    KL ``KL(p_T || p_S) = -sum p_T d`` has gradient ``p_S - p_T``; ``mixed`` adds the two. The
    ``(n, V)`` buffers are reused in place: a chunk never holds more than four of them.
    """
    # Logits from a linear head are finite, so log_softmax is too and _log_probs's clamp is not needed.
    log_s = F.log_softmax(_upcast(student_logits), dim=-1)  # (n, V)
    log_t = F.log_softmax(_upcast(teacher_logits), dim=-1)  # (n, V)
    student_p = log_s.exp()  # (n, V)
    diff = log_s.sub_(log_t)  # (n, V) log p_S - log p_T, in the log_s buffer
    if kind == "forward_kl":
        teacher_p = log_t.exp_()  # (n, V)
        return -_row_dot(teacher_p, diff), student_p.sub_(teacher_p)
    reverse = _row_dot(student_p, diff)  # (n,)
    if kind == "reverse_kl":
        return reverse, diff.sub_(reverse[:, None]).mul_(student_p)
    # kind == "mixed"
    teacher_p = log_t.exp_()  # (n, V)
    forward = -_row_dot(teacher_p, diff)  # (n,)
    grad = diff.sub_(reverse[:, None]).mul_(student_p)  # (n, V)
    grad.add_(student_p.sub_(teacher_p), alpha=forward_weight)
    return reverse + forward_weight * forward, grad


def _autograd_divergence(
    student_logits: Tensor, teacher_logits: Tensor, *, tokens: Tensor | None, spec: DivergenceSpec
):
    """Per-token values and the gradient of their sum with respect to the student logits, by autograd."""
    with torch.enable_grad():
        logits = _upcast(student_logits).detach().requires_grad_(True)  # (n, V) fp32, so the gradient is fp32
        values = per_token_divergence(
            logits,
            teacher_logits,
            tokens=tokens,
            kind=spec.kind,
            beta=spec.beta,
            forward_weight=spec.forward_weight,
            term_clip=spec.term_clip,
            teacher_top_k=spec.teacher_top_k,
        )  # (n,)
        (grad,) = torch.autograd.grad(values.sum(), logits)  # (n, V)
    return values.detach(), grad


def _linear_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(hidden, weight, bias)``, computed as ``(weight @ hidden.T).T``.

    Same values. On CPU (MKL) the tall ``(V, H) @ (H, n)`` product runs ~1.5x faster than
    ``(n, H) @ (H, V)`` for a large vocabulary; ``log_softmax`` then copies the transposed view
    once, which costs less than the difference (~10% off the whole loss at V = 32k, H = 256).
    """
    logits = (weight @ hidden.t()).t()  # (n, V)
    return logits if bias is None else logits + bias


def _divergence_chunks(
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Tensor | None,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    teacher_bias: Tensor | None,
    tokens: Tensor | None,
    *,
    chunk_size: int,
    spec: DivergenceSpec,
    grads: tuple[bool, bool, bool] = (False, False, False),
):
    """Per-token divergences, chunk by chunk, and the gradients of their sum that ``grads`` asks for.

    ``grads`` = (hidden, weight, bias). A chunk's logits live only inside its iteration: its gradient
    with respect to the logits is turned into the hidden-state and head gradients at once (two
    matmuls), so nothing is recomputed in backward and no logits are kept.
    """
    want_hidden, want_weight, want_bias = grads
    n_rows = student_hidden.shape[0]
    per_token = torch.empty(
        n_rows, dtype=torch.promote_types(student_hidden.dtype, torch.float32), device=student_hidden.device
    )  # (N,)
    grad_hidden = torch.empty_like(student_hidden) if want_hidden else None  # (N, H)
    grad_weight = torch.zeros_like(student_weight, dtype=per_token.dtype) if want_weight else None  # (V, H)
    grad_bias = torch.zeros_like(student_bias, dtype=per_token.dtype) if want_bias else None  # (V,)
    for start in range(0, n_rows, chunk_size):
        stop = min(start + chunk_size, n_rows)
        hidden = student_hidden[start:stop]  # (n, H)
        student_logits = _linear_logits(hidden, student_weight, student_bias)  # (n, V)
        teacher_logits = _linear_logits(teacher_hidden[start:stop], teacher_weight, teacher_bias)  # (n, V)
        if spec.closed_form:
            values, grad_logits = _analytic_divergence(
                student_logits, teacher_logits, kind=spec.kind, forward_weight=spec.forward_weight
            )  # (n,), (n, V)
        else:
            token_chunk = None if tokens is None else tokens[start:stop]  # (n,)
            values, grad_logits = _autograd_divergence(
                student_logits, teacher_logits, tokens=token_chunk, spec=spec
            )  # (n,), (n, V)
        per_token[start:stop] = values
        del student_logits, teacher_logits
        if want_hidden:
            grad_hidden[start:stop] = grad_logits.to(student_weight.dtype) @ student_weight  # (n, H)
        if want_weight:
            grad_weight.addmm_(grad_logits.t(), hidden.to(grad_weight.dtype))  # (V, H)
        if want_bias:
            grad_bias += grad_logits.sum(dim=0)  # (V,)
    return per_token, grad_hidden, grad_weight, grad_bias


class _DivergenceSum(torch.autograd.Function):
    """Sum of the chunked per-token divergences; the gradients are computed in forward, scaled in backward."""

    @staticmethod
    def forward(
        ctx,
        student_hidden,
        student_weight,
        student_bias,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        tokens,
        chunk_size,
        spec,
    ):
        per_token, grad_hidden, grad_weight, grad_bias = _divergence_chunks(
            student_hidden,
            student_weight,
            student_bias,
            teacher_hidden,
            teacher_weight,
            teacher_bias,
            tokens,
            chunk_size=chunk_size,
            spec=spec,
            grads=tuple(ctx.needs_input_grad[:3]),
        )
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (student_hidden.dtype, student_weight.dtype)
        ctx.mark_non_differentiable(per_token)
        return per_token.sum(), per_token

    @staticmethod
    def backward(ctx, grad_total, _grad_per_token):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        scale = lambda grad, dtype: None if grad is None else (grad * grad_total).to(dtype)  # noqa: E731
        return (
            scale(grad_hidden, hidden_dtype),
            scale(grad_weight, weight_dtype),
            scale(grad_bias, weight_dtype),
            None,
            None,
            None,
            None,
            None,
            None,
        )


def divergence_sum(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    spec: DivergenceSpec,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    chunk_size: int = 128,
    tokens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Sum over positions of ``per_token_divergence`` between two linear LM heads, without the ``(N, V)`` logits.

    Equals ``per_token_divergence(F.linear(student_hidden, W_S, b_S), F.linear(teacher_hidden, W_T, b_T),
    ...).sum()``, value and gradients, but the rows are processed ``chunk_size`` at a time and each
    chunk's gradient with respect to its logits is folded into the gradients of ``student_hidden``,
    ``student_weight`` and ``student_bias`` as soon as it is known (in closed form for reverse KL,
    forward KL and ``mixed`` without ``term_clip``/``teacher_top_k``, by autograd on the chunk
    otherwise). Peak memory is a few ``(chunk_size, V)`` buffers plus one ``(V, H)`` gradient, whatever
    ``N``; nothing is recomputed in backward. The result is a sum, so the upstream gradient is a scalar
    (divide it by a token count afterwards as usual). The teacher side is a constant.

    Args:
        student_hidden: ``(N, H)`` student hidden states at the scored positions.
        student_weight: ``(V, H)`` student LM-head weight (may be tied to the input embedding).
        teacher_hidden: ``(N, H)`` teacher hidden states at the same positions.
        teacher_weight: ``(V, H)`` teacher LM-head weight (may be the same tensor as the student's).
        spec: the divergence and its options.
        student_bias, teacher_bias: optional ``(V,)`` head biases.
        chunk_size: rows per chunk (``>= 1``); need not divide ``N``.
        tokens: ``(N,)`` sampled ids, for ``kind="sampled_token"``.

    Returns:
        ``(total, per_token)``: the 0-d sum (differentiable) and the ``(N,)`` values (detached), fp32
        (fp64 for fp64 inputs).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n_rows = student_hidden.shape[0]
    if teacher_hidden.shape[0] != n_rows:
        raise ValueError(f"student_hidden has {n_rows} rows but teacher_hidden has {teacher_hidden.shape[0]}")
    if tokens is not None and tokens.shape[0] != n_rows:
        raise ValueError(f"tokens has {tokens.shape[0]} entries, expected {n_rows}")
    teacher = [None if t is None else t.detach() for t in (teacher_hidden, teacher_weight, teacher_bias)]
    student = (student_hidden, student_weight, student_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in student):
        return _DivergenceSum.apply(*student, *teacher, tokens, chunk_size, spec)
    per_token = _divergence_chunks(*student, *teacher, tokens, chunk_size=chunk_size, spec=spec)[0]
    return per_token.sum(), per_token


def clipped_surrogate_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    aggregation: str = "token",
    normaliser: float | None = None,
    kl_coef: float = 0.0,
    ref_logprobs: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO/GRPO clipped surrogate with DAPO's decoupled clip range, as a loss to minimise.

    Per valid token ``(i, t)``, with ``r = exp(logprobs - old_logprobs)`` and ``A = advantages[i]``::

        objective = min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)
        per_token = -objective + kl_coef * k3,   k3 = exp(ref - logp) - (ref - logp) - 1

    (``k3`` is the unbiased, non-negative estimator of ``KL(pi || pi_ref)``; only when
    ``kl_coef != 0``.) ``old_logprobs``, ``advantages`` and ``ref_logprobs`` are constants.

    Aggregation:
        * ``"token"`` (DAPO): ``sum of per_token over valid tokens / normaliser``. ``normaliser``
          defaults to the number of valid tokens in the batch (at least 1); pass a constant (for
          example batch size x a fixed maximum length) so that the loss scale does not depend on the
          scheduled maximum length or on the lengths of this batch.
        * ``"sequence"`` (original GRPO): mean over each sequence's valid tokens, then mean over the
          sequences that have at least one valid token. ``normaliser`` is not allowed here.

    Args:
        logprobs: ``(B, T)`` log-probabilities of the sampled tokens under the current policy.
        old_logprobs: ``(B, T)`` the same under the policy that sampled them.
        advantages: ``(B,)`` one advantage per sequence.
        mask: ``(B, T)`` bool or 0/1 float, true on response tokens that count.
        eps_low, eps_high: clip range ``[1 - eps_low, 1 + eps_high]``.
        aggregation: ``"token"`` or ``"sequence"``.
        normaliser: constant denominator for ``"token"`` aggregation.
        kl_coef: weight of the k3 KL penalty to ``ref_logprobs``.
        ref_logprobs: ``(B, T)`` reference-policy log-probabilities (needed when ``kl_coef != 0``).

    Returns:
        ``(loss, stats)``: ``loss`` a 0-d fp32 tensor (fp64 for fp64 inputs); ``stats`` plain floats over valid tokens:
        ``clip_frac_low`` (fraction where ``r < 1 - eps_low`` and ``A < 0``, i.e. the clipped branch
        is the active one on the low side, so the token has no gradient), ``clip_frac_high``
        (``r > 1 + eps_high`` and ``A > 0``), ``ratio_mean``, and ``kl`` (mean k3) when
        ``kl_coef != 0``.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")
    if aggregation == "sequence" and normaliser is not None:
        raise ValueError("normaliser only applies to aggregation='token'")
    if normaliser is not None and normaliser <= 0:
        raise ValueError(f"normaliser must be > 0, got {normaliser}")
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"eps_low and eps_high must be >= 0, got {eps_low} and {eps_high}")
    if logprobs.dim() != 2 or logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(
            "logprobs, old_logprobs and mask must all be (B, T) with the same shape, got "
            f"{tuple(logprobs.shape)}, {tuple(old_logprobs.shape)}, {tuple(mask.shape)}"
        )
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be (B,) = {tuple(logprobs.shape[:1])}, got {tuple(advantages.shape)}")
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError("kl_coef != 0 needs ref_logprobs")

    valid = mask.bool()  # (B, T)
    logp = _upcast(logprobs)  # (B, T)
    valid_f = valid.to(logp.dtype)  # (B, T)
    n_valid = valid_f.sum()  # ()
    adv = advantages.detach().to(logp.dtype).unsqueeze(1)  # (B, 1)

    # Padding positions may hold -inf or garbage: zero the log-ratio there before exp.
    log_ratio = torch.where(valid, logp - old_logprobs.detach().to(logp.dtype), 0.0)  # (B, T)
    ratio = log_ratio.exp()  # (B, T)
    unclipped = ratio * adv  # (B, T)
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv  # (B, T)
    per_token = -torch.minimum(unclipped, clipped)  # (B, T)

    k3 = None
    if kl_coef != 0.0:
        ref_minus_logp = torch.where(valid, ref_logprobs.detach().to(logp.dtype) - logp, 0.0)  # (B, T)
        k3 = ref_minus_logp.exp() - ref_minus_logp - 1.0  # (B, T)
        per_token = per_token + kl_coef * k3  # (B, T)
    per_token = torch.where(valid, per_token, 0.0)  # (B, T)

    if aggregation == "token":
        denominator = n_valid.clamp(min=1.0) if normaliser is None else float(normaliser)
        loss = per_token.sum() / denominator  # ()
    else:
        tokens_per_seq = valid_f.sum(dim=1)  # (B,)
        seq_mean = per_token.sum(dim=1) / tokens_per_seq.clamp(min=1.0)  # (B,)
        has_tokens = (tokens_per_seq > 0).to(logp.dtype)  # (B,)
        loss = (seq_mean * has_tokens).sum() / has_tokens.sum().clamp(min=1.0)  # ()

    with torch.no_grad():
        count = n_valid.clamp(min=1.0)
        low = (ratio < 1.0 - eps_low) & (adv < 0) & valid  # (B, T)
        high = (ratio > 1.0 + eps_high) & (adv > 0) & valid  # (B, T)
        stats = {
            "clip_frac_low": float(low.float().sum() / count),
            "clip_frac_high": float(high.float().sum() / count),
            "ratio_mean": float((ratio * valid_f).sum() / count),
        }
        if k3 is not None:
            stats["kl"] = float((k3 * valid_f).sum() / count)
    return loss, stats
