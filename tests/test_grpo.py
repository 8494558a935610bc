"""SIRI's GRPO loop: log-probs at the response positions, the scheduled cap reaching generation,
ratio 1 on the first pass, a normaliser that ignores the cap, micro-batching, dynamic sampling,
resume, and the config checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import crisp.grpo as grpo
import crisp.optim as optim
from crisp.config import ConfigError, GRPOConfig, dump_config, load_config, set_path, validate
from crisp.data import synthetic
from crisp.grpo import token_logprobs, train_grpo
from crisp.modeling import load_model
from crisp.prompts import PromptBuilder
from crisp.rollout import HFGenerator
from crisp.schedules import max_length_at


def make_cfg(model_dir, out, **overrides) -> GRPOConfig:
    data = {
        "method": "grpo",
        "output_dir": str(out),
        "max_steps": 2,
        "seed": 0,
        "model": {"path": str(model_dir)},
        "prompt": {"template": "plain"},
        "data": {"source": "synthetic", "size": 64},
        "batch_size": 2,
        "group_size": 4,
        "micro_batch_size": 3,
        "rollout": {"temperature": 1.0, "top_p": 1.0, "top_k": 0},
        "schedule": {"kind": "constant", "l_min": 6, "l_max": 12, "period": 2},
        "chunk_size": 5,
        "optim": {"lr": 1e-2, "grad_clip": 1.0},
        "log_every": 1,
    }
    for key, value in overrides.items():
        set_path(data, key.split("."), value)
    return validate(data)


@pytest.fixture()
def alternating_rewards(monkeypatch):
    """A random tiny model never answers right (all rewards 0, no signal): reward every other
    rollout instead, so that each group has mixed rewards and non-zero advantages."""

    def rewards(batch, rollouts, records, *, cap, tokenizer, grader_name):
        return [float(i % 2) for i in range(len(rollouts))]

    monkeypatch.setattr(grpo, "capped_rewards", rewards)


@pytest.fixture()
def surrogate_calls(monkeypatch):
    """Every call of clipped_surrogate_loss made by the loop: its tensors and keyword arguments."""
    calls = []
    real = grpo.clipped_surrogate_loss

    def recording(logprobs, old_logprobs, advantages, mask, **kwargs):
        calls.append({"logprobs": logprobs.detach().clone(), "old": old_logprobs.clone(), "mask": mask, **kwargs})
        return real(logprobs, old_logprobs, advantages, mask, **kwargs)

    monkeypatch.setattr(grpo, "clipped_surrogate_loss", recording)
    return calls


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# log-probs of the sampled tokens
# ---------------------------------------------------------------------------------------------


def test_token_logprobs_equal_full_logits_per_sequence(tiny_model, tiny_tokenizer):
    builder = PromptBuilder(tiny_tokenizer, template="plain")
    prompts = [builder.student_ids(p) for p in synthetic.test_problems()[::50]]  # one per level
    responses = [[5 + k] * (2 + 3 * k) + [tiny_tokenizer.eos_token_id] for k in range(len(prompts))]
    tiny_model.eval()
    with torch.no_grad():
        logprobs, mask = token_logprobs(tiny_model, prompts, responses, tiny_tokenizer.pad_token_id, chunk_size=4)
    assert logprobs.shape == mask.shape == (4, max(len(r) for r in responses))
    for b, (prompt, response) in enumerate(zip(prompts, responses)):
        logits = tiny_model(input_ids=torch.tensor([prompt + response])).logits[0].float()  # (T, V)
        rows = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(response))
        expected = F.log_softmax(logits[rows], dim=-1).gather(1, torch.tensor(response)[:, None]).squeeze(1)
        torch.testing.assert_close(logprobs[b, : len(response)], expected, rtol=1e-5, atol=1e-5)
        assert mask[b].sum() == len(response) and (logprobs[b, len(response) :] == 0).all()


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------


def test_two_step_run_changes_the_parameters(tiny_model_dir, tmp_path, alternating_rewards):
    out = tmp_path / "run"
    final = train_grpo(make_cfg(tiny_model_dir, out, **{"eval.benchmark": "synthetic", "eval.limit": 2,
                                                         "eval.sampling.max_new_tokens": 4}))
    assert final == out / "model"
    assert not _same(_state(load_model(str(final))), _state(load_model(str(tiny_model_dir))))
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert math.isfinite(m["train/loss"]) and math.isfinite(m["train/grad_norm"])
        assert m["rollout/reward_mean"] == 0.5 and m["rollout/train_groups"] == 2
        assert m["rollout/max_len"] == 12 and 0 < m["rollout/mean_tokens"] <= 12
        assert m["train/ratio_mean"] == pytest.approx(1.0)
        assert {"time/generate", "time/old_logprobs", "time/loss_backward"} <= set(m)
    assert "eval/accuracy" in metrics[-1]
    samples = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert samples and {"cap", "reward", "response"} <= set(samples[0])
    assert load_config(out / "config.yaml").rollout.max_new_tokens == 12  # the dumped config reloads


def test_scheduled_cap_reaches_generation_and_the_normaliser_ignores_it(
    tiny_model_dir, tmp_path, monkeypatch, alternating_rewards, surrogate_calls
):
    limits = []

    class Recording(HFGenerator):
        def generate(self, prompts, sampling, *, max_new_tokens=None, **kwargs):
            limits.append(max_new_tokens)
            rollouts = super().generate(prompts, sampling, max_new_tokens=max_new_tokens, **kwargs)
            assert all(r.num_tokens <= max_new_tokens for r in rollouts)
            return rollouts

    monkeypatch.setattr("crisp.rollout_vllm.HFGenerator", Recording)  # what build_generator builds
    schedule = {"kind": "stair", "l_min": 3, "l_max": 9, "period": 2}
    cfg = make_cfg(tiny_model_dir, tmp_path / "run", max_steps=4, schedule=schedule)
    train_grpo(cfg)
    expected = [max_length_at(t, **schedule) for t in range(4)]
    assert expected == [3, 9, 3, 9]
    assert limits == expected
    assert [m["rollout/max_len"] for m in read_metrics(tmp_path / "run")] == expected
    # the token-level loss is divided by batch_size * group_size * l_max whatever this step's cap is
    assert {call["normaliser"] for call in surrogate_calls} == {2 * 4 * 9}
    assert [m["train/loss_normaliser"] for m in read_metrics(tmp_path / "run")] == [72.0] * 4


def test_first_pass_ratio_is_one(tiny_model_dir, tmp_path, alternating_rewards, surrogate_calls):
    """The old log-probs recorded after sampling equal the first pass's; the second pass (after one
    optimizer step on the same rollouts) differs."""
    train_grpo(make_cfg(tiny_model_dir, tmp_path / "run", max_steps=1, ppo_epochs=2))
    micro_batches = 3  # 8 rollouts in micro-batches of 3
    assert len(surrogate_calls) == 2 * micro_batches
    first, second = surrogate_calls[:micro_batches], surrogate_calls[micro_batches:]
    for call in first:
        assert torch.equal(call["logprobs"], call["old"])
    for a, b in zip(first, second):
        assert torch.equal(a["old"], b["old"])  # recorded once, reused
    assert any(not torch.allclose(c["logprobs"], c["old"]) for c in second)


@pytest.fixture()
def grads(monkeypatch) -> list[dict]:
    """The parameter gradients at every optimizer step, recorded just before clipping."""
    recorded = []
    real = optim.clip_and_check

    def recording(model, max_norm):
        recorded.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        return real(model, max_norm)

    monkeypatch.setattr(optim, "clip_and_check", recording)
    return recorded


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_micro_batches_give_the_full_batch_gradient(tiny_model_dir, tmp_path, alternating_rewards, grads, aggregation):
    for size in (1, 8):
        train_grpo(make_cfg(tiny_model_dir, tmp_path / f"micro{size}", max_steps=1, micro_batch_size=size,
                            aggregation=aggregation))
    micro, full = grads
    assert any(g.abs().max() > 0 for g in full.values())
    for name in full:
        torch.testing.assert_close(micro[name], full[name], rtol=1e-4, atol=1e-7)


def test_zero_advantage_rollouts_are_skipped_without_changing_the_gradient(
    tiny_model_dir, tmp_path, monkeypatch, surrogate_calls, grads
):
    """Group 0's rewards all agree (zero advantages). Without a KL term its rollouts are left out of
    the update; with kl_coef > 0 every rollout goes through, but at the first step the reference is
    the policy and the k3 term has a zero gradient, so both gradients must agree."""
    monkeypatch.setattr(grpo, "capped_rewards", lambda batch, rollouts, *a, **k: [1.0] * 4 + [1.0, 0.0] * 2)
    for kl_coef in (0.0, 1.0):
        train_grpo(make_cfg(tiny_model_dir, tmp_path / f"kl{kl_coef}", max_steps=1, kl_coef=kl_coef))
    rows = [int(call["mask"].shape[0]) for call in surrogate_calls]
    assert rows == [3, 1, 3, 3, 2]  # 4 active rollouts, then all 8, in micro-batches of 3
    (m,) = read_metrics(tmp_path / "kl0.0")
    assert m["train/updated_rollouts"] == 4
    skipped, full = grads
    for name in full:
        torch.testing.assert_close(skipped[name], full[name], rtol=1e-4, atol=1e-7)


def test_dynamic_sampling_keeps_only_groups_with_mixed_rewards(tiny_model_dir, tmp_path, monkeypatch):
    def rewards(batch, rollouts, records, *, cap, tokenizer, grader_name):
        return [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0]  # group 0 all right (no signal), group 1 mixed

    monkeypatch.setattr(grpo, "capped_rewards", rewards)
    train_grpo(make_cfg(tiny_model_dir, tmp_path / "run", max_steps=1, dynamic_sampling=True, max_sampling_rounds=2))
    (m,) = read_metrics(tmp_path / "run")
    assert m["rollout/sampling_rounds"] == 2 and m["rollout/train_groups"] == 2
    assert m["rollout/mixed_group_fraction"] == 0.5


def test_a_step_without_mixed_groups_makes_no_update_and_is_not_a_failure(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(grpo, "capped_rewards", lambda batch, rollouts, *a, **k: [0.0] * len(rollouts))
    final = train_grpo(make_cfg(tiny_model_dir, tmp_path / "run", dynamic_sampling=True, max_skipped_steps=1))
    assert _same(_state(load_model(str(final))), _state(load_model(str(tiny_model_dir))))
    for m in read_metrics(tmp_path / "run"):
        assert m["rollout/train_groups"] == 0 and m["train/skipped_steps"] == 0


def test_extending_a_finished_run_redoes_nothing(tiny_model_dir, tmp_path, alternating_rewards):
    out = tmp_path / "run"
    train_grpo(make_cfg(tiny_model_dir, out, save_every=1))
    first = read_metrics(out)
    final = train_grpo(make_cfg(tiny_model_dir, out, max_steps=3, save_every=1, resume="auto"))
    resumed = read_metrics(out)
    assert [m["step"] for m in resumed] == [1, 2, 3]
    assert resumed[:2] == first  # the last step was checkpointed: not redone, timings included
    straight = train_grpo(make_cfg(tiny_model_dir, tmp_path / "straight", max_steps=3))
    a, b = _state(load_model(str(final))), _state(load_model(str(straight)))
    assert _same(a, b)


# ---------------------------------------------------------------------------------------------
# TFPI: staged caps and prompt modes
# ---------------------------------------------------------------------------------------------

# thinking-free stages of growing length, then a last one in thinking mode ("TFPI + RL")
STAGES = [{"max_length": 3, "steps": 2}, {"max_length": 5, "steps": 1},
          {"max_length": 7, "steps": 2, "thinking_free": False}]


def staged(**overrides) -> dict:
    return {"schedule": {"kind": "stages", "stages": STAGES}, "prompt.thinking_free": True, "max_steps": 5,
            **overrides}


def test_step_plan_follows_the_stages(tiny_model_dir, tmp_path):
    cfg = make_cfg(tiny_model_dir, tmp_path, **staged())
    plans = [grpo.step_plan(cfg, t) for t in range(5)]
    assert [p.cap for p in plans] == [3, 3, 5, 7, 7]
    assert [p.stage for p in plans] == [1, 1, 2, 3, 3]
    assert [p.stage_start for p in plans] == [True, False, True, True, False]
    assert [p.thinking_free for p in plans] == [True, True, True, False, False]
    assert (cfg.schedule.l_min, cfg.schedule.l_max, cfg.rollout.max_new_tokens) == (3, 7, 7)
    periodic = make_cfg(tiny_model_dir, tmp_path, **{"prompt.thinking_free": True})
    assert grpo.step_plan(periodic, 0) == grpo.StepPlan(12, True)  # no stage, the run's mode


def test_stages_reach_generation_and_prompts_and_are_logged(tiny_model_dir, tmp_path, monkeypatch,
                                                            alternating_rewards, surrogate_calls, tiny_tokenizer):
    calls = []

    class Recording(HFGenerator):
        def generate(self, prompts, sampling, *, max_new_tokens=None, **kwargs):
            calls.append((max_new_tokens, [tiny_tokenizer.decode(p) for p in prompts]))
            return super().generate(prompts, sampling, max_new_tokens=max_new_tokens, **kwargs)

    monkeypatch.setattr("crisp.rollout_vllm.HFGenerator", Recording)  # what build_generator builds
    train_grpo(make_cfg(tiny_model_dir, tmp_path / "run", log_every=10, **staged()))
    assert [limit for limit, _ in calls] == [3, 3, 5, 7, 7]
    closed = [all(p.endswith("<think>\n\n</think>\n\n") for p in prompts) for _, prompts in calls]
    assert closed == [True, True, True, False, False]
    assert not any("<think>" in p for _, prompts in calls[3:] for p in prompts)  # thinking mode: no block at all
    # log_every 10 writes only the last step, but the first step of every stage is logged too
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [1, 3, 4, 5]
    assert [m.get("train/stage_start") for m in metrics] == [1, 2, 3, None]
    assert [m["rollout/stage"] for m in metrics] == [1, 2, 3, 3]
    assert [m["rollout/max_len"] for m in metrics] == [3, 5, 7, 7]
    assert [m["rollout/thinking_free"] for m in metrics] == [True, True, False, False]
    # the loss normaliser is batch_size * group_size * the largest stage's length, at every stage
    assert {call["normaliser"] for call in surrogate_calls} == {2 * 4 * 7}


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"eps_low": 0.3, "eps_high": 0.2}, "eps_high"),
        ({"schedule": {"l_min": 300, "l_max": 200}}, "schedule.l_max"),
        ({"group_size": 1}, "group_size"),
        ({"rollout": {"n": 3}}, "rollout.n"),
        ({"rollout": {"max_new_tokens": 5}}, "rollout.max_new_tokens"),
        ({"schedule": {"kind": "linear"}}, "schedule.kind"),
        ({"schedule": {"kind": "stages"}}, "schedule.stages"),
        ({"schedule": {"kind": "stages", "stages": []}}, "schedule.stages"),
        ({"schedule": {"kind": "cosine", "stages": [{"max_length": 4, "steps": 1}]}}, "schedule.stages"),
        ({"schedule": {"kind": "stages", "stages": [{"max_length": 4, "steps": 0}]}}, "schedule.stages.0.steps"),
        ({"schedule": {"kind": "stages", "stages": [{"max_length": 4, "steps": 1}], "l_max": 8}}, "schedule.l_max"),
        ({"schedule": {"kind": "stages", "stages": [{"max_length": 4, "steps": 1}], "period": 8}}, "schedule.period"),
        ({"max_steps": 3, "schedule": {"kind": "stages", "stages": [{"max_length": 4, "steps": 2}]}}, "max_steps"),
    ],
)
def test_config_errors_name_the_key(overrides, key):
    data = {"method": "grpo", "output_dir": "x", "max_steps": 1, "model": {"path": "m"}, **overrides}
    with pytest.raises(ConfigError) as error:
        validate(data)
    assert str(error.value).startswith(key) or f"{key} (" in str(error.value)


def test_a_staged_schedule_dumps_without_its_derived_bounds_and_reloads(tmp_path):
    cfg = validate({"method": "grpo", "output_dir": "x", "max_steps": 2, "model": {"path": "m"},
                    "schedule": {"kind": "stages", "stages": [{"max_length": 40, "steps": 1},
                                                              {"max_length": 80, "steps": 1}]}})
    assert (cfg.schedule.l_min, cfg.schedule.l_max, cfg.rollout.max_new_tokens) == (40, 80, 80)
    dump_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml", ["schedule.stages=[{max_length: 50, steps: 2}]"])
    assert (again.schedule.l_min, again.schedule.l_max, again.rollout.max_new_tokens) == (50, 50, 50)
    assert load_config(tmp_path / "config.yaml") == cfg


def test_rollout_takes_group_size_and_l_max_and_the_dump_reloads(tmp_path):
    cfg = validate({"method": "grpo", "output_dir": "x", "max_steps": 1, "model": {"path": "m"}, "group_size": 6,
                    "schedule": {"l_min": 50, "l_max": 90}, "rollout": {"temperature": 0.7, "n": 6}})
    assert (cfg.rollout.n, cfg.rollout.max_new_tokens, cfg.rollout.temperature) == (6, 90, 0.7)
    dump_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml", ["group_size=3", "schedule.l_max=120"])
    assert (again.rollout.n, again.rollout.max_new_tokens, again.rollout.temperature) == (3, 120, 0.7)


def test_siri_configs_load():
    root = Path(__file__).resolve().parents[1] / "configs"
    for path in (root / "recipes" / "siri-r1-distill-qwen-1.5b.yaml", root / "demo" / "siri.yaml"):
        cfg = load_config(path)
        assert cfg.method == "grpo" and cfg.schedule.l_min <= cfg.schedule.l_max
