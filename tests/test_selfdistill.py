"""The CRISP/OPSD engine: alignment of student and teacher on the response tokens, the divergence
against a per-rollout loop, the rollout filter, the teacher's update rules, gradient accumulation,
and short end-to-end runs (including an empty rollout filter and resume)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import read_metrics, same_weights, snapshot, tiny_run

from crisp.config import ConfigError
from crisp.data import synthetic
from crisp.driver import Training, train
from crisp.losses import per_token_divergence
from crisp.methods.selfdistill import (
    DistillBatch,
    LossConfig,
    SelfDistillConfig,
    distill_backward,
    distill_loss_sum,
    keep_rollouts,
)
from crisp.modeling import load_model, response_hidden
from crisp.prompts import PromptBuilder, resolve_instruction
from crisp.rollout import Rollout
from crisp.teacher import Teacher


@pytest.fixture()
def batch(tiny_tokenizer):
    """Student prompts, longer CRISP teacher prompts, and responses of different lengths."""
    builder = PromptBuilder(tiny_tokenizer, template="plain")
    problems = synthetic.test_problems()[::50]  # one per level
    instruction = resolve_instruction("v1")
    student = [builder.student_ids(p) for p in problems]
    teacher = [builder.teacher_ids(p, instruction=instruction) for p in problems]
    responses = []
    for k, p in enumerate(problems):
        text = p.solution if k % 2 == 0 else "Let me think step by step.\n" + p.solution
        ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"][: 5 + 4 * k]
        responses.append(ids + [tiny_tokenizer.eos_token_id])
    assert len({len(r) for r in responses}) == len(responses)
    assert all(len(t) > len(s) for s, t in zip(student, teacher))
    return student, teacher, responses


def perturbed_copy(model, scale=0.05, seed=0):
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return other.requires_grad_(False)


def as_teacher(model):
    """A Teacher that runs `model` as it is."""
    return Teacher(model, update="live")


def explicit_log_probs(model, prompt, response):
    """log_softmax of the full model's logits at the positions predicting each response token."""
    ids = torch.tensor([list(prompt) + list(response)])
    logits = model(input_ids=ids).logits[0].double()  # (T, V)
    rows = [len(prompt) - 1 + j for j in range(len(response))]
    return F.log_softmax(logits[rows], dim=-1)  # (R, V)


# ---------------------------------------------------------------------------------------------
# alignment and the divergence
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_response_hidden_equals_per_sequence_computation(tiny_model, tiny_tokenizer, batch, side):
    student, teacher, responses = batch
    prompts = student if side == "student" else teacher
    tiny_model.eval()
    with torch.no_grad():
        rows = response_hidden(tiny_model, prompts, responses, tiny_tokenizer.pad_token_id)  # (N, H)
        expected = []
        for prompt, response in zip(prompts, responses):
            ids = torch.tensor([list(prompt) + list(response)])
            hidden = tiny_model.base_model(input_ids=ids).last_hidden_state[0]  # (T, H)
            expected += [hidden[len(prompt) - 1 + j] for j in range(len(response))]
    assert rows.shape == (sum(map(len, responses)), tiny_model.config.hidden_size)
    torch.testing.assert_close(rows, torch.stack(expected), rtol=1e-5, atol=1e-5)
    # the lm head on these rows gives the full model's logits at the same positions
    with torch.no_grad():
        logits = tiny_model.get_output_embeddings()(rows)
        full = torch.cat([explicit_log_probs(tiny_model, p, r) for p, r in zip(prompts, responses)])
    torch.testing.assert_close(F.log_softmax(logits.double(), -1), full, rtol=1e-5, atol=1e-5)


def _by_hand(kind, log_s, log_t, forward_weight=0.5):
    p_s, p_t = log_s.exp(), log_t.exp()
    reverse = (p_s * (log_s - log_t)).sum(-1)
    forward = (p_t * (log_t - log_s)).sum(-1)
    return {"reverse_kl": reverse, "forward_kl": forward, "mixed": reverse + forward_weight * forward}[kind]


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "mixed"])
def test_distill_loss_sum_equals_a_loop_by_hand(tiny_model, tiny_tokenizer, batch, kind):
    student_prompts, teacher_prompts, responses = batch
    tiny_model.eval()
    teacher_model = perturbed_copy(tiny_model)
    cfg = LossConfig(divergence=kind, forward_weight=0.5, chunk_size=3)  # chunks cross rollout boundaries
    with torch.no_grad():
        total = distill_loss_sum(
            tiny_model,
            as_teacher(teacher_model),
            student_prompts,
            teacher_prompts,
            responses,
            cfg,
            tiny_tokenizer.pad_token_id,
        )
        expected = 0.0
        for s, t, r in zip(student_prompts, teacher_prompts, responses):
            log_s = explicit_log_probs(tiny_model, s, r)
            log_t = explicit_log_probs(teacher_model, t, r)
            expected += _by_hand(kind, log_s, log_t).sum().item()
    assert expected > 1e-4  # the check below is not 0 == 0
    assert total.item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("kind", ["reverse_kl", "mixed", "jsd"])
def test_distill_loss_sum_gradient_equals_autograd_through_the_full_logits(tiny_model, tiny_tokenizer, batch, kind):
    """The chunked loss's gradients, folded in during the forward pass, reach every parameter of the
    model (the tied embedding included) exactly as autograd through the whole (T, V) logits would."""
    student_prompts, teacher_prompts, responses = batch
    teacher_model = perturbed_copy(tiny_model, seed=2)
    cfg = LossConfig(divergence=kind, forward_weight=0.5, beta=0.3, chunk_size=5)
    distill_loss_sum(
        tiny_model,
        as_teacher(teacher_model),
        student_prompts,
        teacher_prompts,
        responses,
        cfg,
        tiny_tokenizer.pad_token_id,
    ).backward()
    fused = _grads(tiny_model)
    tiny_model.zero_grad(set_to_none=True)
    for s, t, r in zip(student_prompts, teacher_prompts, responses):
        with torch.no_grad():
            teacher_logits = explicit_log_probs(teacher_model, t, r)  # (R, V) log-probs: same softmax
        per_token_divergence(
            explicit_log_probs(tiny_model, s, r), teacher_logits, kind=kind, beta=0.3, forward_weight=0.5
        ).sum().backward()
    reference = _grads(tiny_model)
    assert set(fused) == set(reference) and "model.embed_tokens.weight" in fused
    assert all(g.abs().max() > 0 for g in reference.values())
    for name in reference:
        torch.testing.assert_close(fused[name].double(), reference[name].double(), rtol=1e-4, atol=1e-7)


def test_teacher_prompt_matters_through_alignment(tiny_model, tiny_tokenizer, batch):
    """Same weights, different context: KL > 0; swapping which rollout gets which prompt changes it."""
    student_prompts, teacher_prompts, responses = batch
    tiny_model.eval()
    cfg = LossConfig(divergence="reverse_kl")
    pad = tiny_tokenizer.pad_token_id
    with torch.no_grad():
        loss = distill_loss_sum(
            tiny_model, as_teacher(tiny_model), student_prompts, teacher_prompts, responses, cfg, pad
        )
        expected = sum(
            _by_hand("reverse_kl", explicit_log_probs(tiny_model, s, r), explicit_log_probs(tiny_model, t, r))
            .sum()
            .item()
            for s, t, r in zip(student_prompts, teacher_prompts, responses)
        )
    assert loss.item() > 0
    assert loss.item() == pytest.approx(expected, rel=1e-3)


def test_kl_is_zero_for_same_prompt_and_a_copy(tiny_model, tiny_tokenizer, batch):
    student_prompts, _, responses = batch
    teacher = Teacher(tiny_model, update="frozen")
    for kind in ("reverse_kl", "forward_kl", "jsd", "mixed"):
        loss = distill_loss_sum(
            tiny_model,
            teacher,
            student_prompts,
            student_prompts,
            responses,
            LossConfig(divergence=kind),
            tiny_tokenizer.pad_token_id,
        )
        assert abs(loss.item()) < 1e-5, kind


def test_keep_rollouts():
    correct = [True, False, False, True, False]
    assert keep_rollouts(correct, "all") == [0, 1, 2, 3, 4]
    assert keep_rollouts(correct, "correct") == [0, 3]
    assert keep_rollouts(correct, "incorrect") == [1, 2, 4]
    assert keep_rollouts([False, False], "correct") == []
    assert keep_rollouts([], "all") == []


# ---------------------------------------------------------------------------------------------
# teacher update rules
# ---------------------------------------------------------------------------------------------


def _nudge(model, step):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * (step + 1))


def test_frozen_teacher_never_changes(tiny_model):
    initial = snapshot(tiny_model)
    teacher = Teacher(tiny_model, update="frozen", refresh_every=2)
    assert teacher.model is not tiny_model and teacher.owns_weights
    assert not any(p.requires_grad for p in teacher.model.parameters())
    for step in range(1, 6):
        _nudge(tiny_model, step)
        assert teacher.after_step(step, tiny_model) is False
    assert same_weights(snapshot(teacher.model), initial)
    assert not same_weights(snapshot(tiny_model), initial)
    assert teacher.refreshes == 0


def test_refresh_teacher_changes_exactly_every_m_steps(tiny_model):
    teacher = Teacher(tiny_model, update="refresh", refresh_every=3)
    changed_at = []
    for step in range(1, 8):
        _nudge(tiny_model, step)
        before = snapshot(teacher.model)
        refreshed = teacher.after_step(step, tiny_model)
        after = snapshot(teacher.model)
        assert refreshed == (not same_weights(before, after))
        if refreshed:
            changed_at.append(step)
            assert same_weights(after, snapshot(tiny_model))
    assert changed_at == [3, 6]
    assert teacher.refreshes == 2


def test_refresh_every_zero_never_refreshes(tiny_model):
    initial = snapshot(tiny_model)
    teacher = Teacher(tiny_model, update="refresh", refresh_every=0)
    for step in range(1, 5):
        _nudge(tiny_model, step)
        assert teacher.after_step(step, tiny_model) is False
    assert same_weights(snapshot(teacher.model), initial) and teacher.refreshes == 0


def test_ema_teacher_moves_by_the_decay(tiny_model):
    teacher = Teacher(tiny_model, update="ema", ema_decay=0.9)
    name = "model.layers.0.mlp.up_proj.weight"
    t0 = dict(teacher.model.named_parameters())[name].detach().clone()
    _nudge(tiny_model, 4)
    s1 = dict(tiny_model.named_parameters())[name].detach().clone()
    assert not torch.equal(t0, s1)
    assert teacher.after_step(1, tiny_model) is True
    t1 = dict(teacher.model.named_parameters())[name]
    torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * s1)
    with torch.no_grad():
        tiny_model.get_parameter(name).mul_(-1)
    teacher.after_step(2, tiny_model)
    torch.testing.assert_close(dict(teacher.model.named_parameters())[name], 0.9 * (0.9 * t0 + 0.1 * s1) - 0.1 * s1)


def test_live_teacher_is_the_student(tiny_model):
    teacher = Teacher(tiny_model, update="live")
    assert teacher.model is tiny_model and not teacher.owns_weights
    assert teacher.after_step(1, tiny_model) is False


def test_unknown_teacher_update(tiny_model):
    with pytest.raises(ValueError, match="frozen"):
        Teacher(tiny_model, update="sometimes")


# ---------------------------------------------------------------------------------------------
# gradient accumulation
# ---------------------------------------------------------------------------------------------


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["reverse_kl", "mixed"])
def test_micro_batches_give_the_full_batch_gradient(tiny_model, tiny_tokenizer, batch, kind):
    student_prompts, teacher_prompts, responses = batch
    teacher_model = perturbed_copy(tiny_model, seed=1)
    cfg = LossConfig(divergence=kind, chunk_size=4)
    pad = tiny_tokenizer.pad_token_id
    num_tokens = sum(map(len, responses))

    teacher = as_teacher(teacher_model)
    (
        distill_loss_sum(tiny_model, teacher, student_prompts, teacher_prompts, responses, cfg, pad) / num_tokens
    ).backward()
    full = _grads(tiny_model)
    tiny_model.zero_grad(set_to_none=True)
    for i in range(len(responses)):
        (
            distill_loss_sum(
                tiny_model,
                teacher,
                student_prompts[i : i + 1],
                teacher_prompts[i : i + 1],
                responses[i : i + 1],
                cfg,
                pad,
            )
            / num_tokens
        ).backward()
    micro = _grads(tiny_model)
    assert set(full) == set(micro) and full
    assert any(g.abs().max() > 0 for g in full.values())
    for name in full:
        torch.testing.assert_close(micro[name], full[name], rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in teacher_model.parameters())


def _rollouts(student_prompts, responses, order):
    return [Rollout(i, tuple(student_prompts[i]), tuple(responses[i]), "", "stop") for i in order]


def test_distill_backward_buckets_micro_batches_by_length_without_changing_the_step(tiny_model, tiny_tokenizer, batch):
    student_prompts, teacher_prompts, responses = batch
    teacher = as_teacher(perturbed_copy(tiny_model, seed=3))
    pad = tiny_tokenizer.pad_token_id
    order = [2, 0, 3, 1]  # not sorted by length
    rollouts = _rollouts(student_prompts, responses, order)
    teachers = [teacher_prompts[i] for i in order]
    calls = []  # the lengths of the sequences of every student forward pass

    def record(module, args, kwargs):
        calls.append(kwargs["attention_mask"].sum(dim=1).tolist())

    hook = tiny_model.register_forward_pre_hook(record, with_kwargs=True)
    results = {}
    for size in (4, 2):
        calls.clear()
        loss = distill_backward(
            tiny_model,
            teacher,
            DistillBatch(rollouts, teachers),
            LossConfig(divergence="mixed", chunk_size=4),
            pad_id=pad,
            micro_batch_size=size,
        )
        results[size] = (loss, _grads(tiny_model), list(calls))
        tiny_model.zero_grad(set_to_none=True)
    hook.remove()
    lengths = sorted(len(student_prompts[i]) + len(responses[i]) for i in order)
    assert results[4][2] == [[len(student_prompts[i]) + len(responses[i]) for i in order]]  # one batch: as given
    assert results[2][2] == [lengths[:2], lengths[2:]]  # two micro-batches: the two shortest, the two longest
    assert results[2][0] == pytest.approx(results[4][0], rel=1e-6) and results[4][0] > 0
    for name, grad in results[4][1].items():
        torch.testing.assert_close(results[2][1][name], grad, rtol=1e-4, atol=1e-7)
    empty = distill_backward(tiny_model, teacher, DistillBatch([], []), LossConfig(), pad_id=pad, micro_batch_size=2)
    assert math.isnan(empty)


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------


def make_cfg(model_dir, out, **overrides) -> SelfDistillConfig:
    settings = {
        "batch_size": 4,
        "micro_batch_size": 2,
        "rollout": {"n": 1, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 16},
        "teacher": {"instruction": "v1", "update": "frozen"},
        "loss": {"divergence": "reverse_kl", "chunk_size": 16},
    }
    return tiny_run("selfdistill", model_dir, out, settings, overrides)


def test_two_step_run_trains_the_student_and_keeps_the_frozen_teacher(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    cfg = make_cfg(
        tiny_model_dir, out, **{"eval.benchmark": "synthetic", "eval.limit": 3, "eval.sampling.max_new_tokens": 6}
    )
    training = Training(cfg)
    final = training.run()
    assert final == out / "model"
    initial = snapshot(load_model(str(tiny_model_dir)))
    trained = snapshot(load_model(str(final)))
    assert not same_weights(trained, initial)
    teacher = training.method.teacher
    assert teacher.update == "frozen"
    assert same_weights(snapshot(teacher.model), initial)
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert math.isfinite(m["train/loss"]) and m["train/loss"] > 0
        assert m["rollout/kept"] == 4
        assert m["train/skipped_steps"] == 0
        assert 0 < m["rollout/mean_tokens"] <= 16
        assert any(k.startswith("time/") for k in m)
    assert "eval/accuracy" in metrics[-1] and "eval/L1_accuracy" in metrics[-1]
    assert (out / "config.yaml").is_file() and (out / "rollouts.jsonl").is_file()
    assert (final / "config.json").is_file() and (final / "tokenizer.json").is_file()


def test_correct_only_filter_with_no_correct_rollouts_does_not_update(tiny_model_dir, tmp_path):
    """An untrained model answers nothing right: rollout_filter=correct keeps no rollout. Such a step
    makes no update, and it is not a failure either (it must not count towards max_skipped_steps)."""
    out = tmp_path / "run"
    cfg = make_cfg(tiny_model_dir, out, rollout_filter="correct", max_steps=3, max_skipped_steps=1)
    final = train(cfg)
    assert same_weights(snapshot(load_model(str(final))), snapshot(load_model(str(tiny_model_dir))))
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert m["rollout/accuracy"] == 0 and m["rollout/kept"] == 0
        assert m["train/skipped_steps"] == 0


def test_incorrect_only_filter_trains(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    final = train(make_cfg(tiny_model_dir, out, rollout_filter="incorrect", max_steps=1))
    assert not same_weights(snapshot(load_model(str(final))), snapshot(load_model(str(tiny_model_dir))))
    assert read_metrics(out)[0]["rollout/kept"] == 4


def _comparable(m: dict) -> dict:
    return {k: v for k, v in m.items() if not k.startswith("time/")}


def test_extending_a_finished_run_redoes_nothing(tiny_model_dir, tmp_path):
    """The last step is checkpointed: resume=auto with a larger max_steps starts after it, keeps the
    first run's records untouched and ends bitwise equal to a run that went straight through."""
    out = tmp_path / "run"
    common = {"save_every": 1, "teacher.update": "refresh", "teacher.refresh_every": 1}
    train(make_cfg(tiny_model_dir, out, **common))
    first = read_metrics(out)
    assert [m["step"] for m in first] == [1, 2]
    assert (out / "checkpoints" / "step-00000002" / "teacher").is_dir()
    with pytest.raises(ConfigError, match="resume=auto"):  # relaunched without resume: nothing is wiped
        train(make_cfg(tiny_model_dir, out, max_steps=3, **common))
    assert read_metrics(out) == first

    final = train(make_cfg(tiny_model_dir, out, max_steps=3, resume="auto", **common))
    resumed = read_metrics(out)
    assert [m["step"] for m in resumed] == [1, 2, 3]
    assert resumed[:2] == first  # not redone: even the timings are the first run's
    assert resumed[2]["teacher/refreshes"] == 3  # the count carries over the resume
    assert (final / "config.json").is_file()

    straight = tmp_path / "straight"
    final_straight = train(make_cfg(tiny_model_dir, straight, max_steps=3, **common))
    a, b = snapshot(load_model(str(final))), snapshot(load_model(str(final_straight)))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [_comparable(m) for m in read_metrics(straight)] == [_comparable(m) for m in resumed]
