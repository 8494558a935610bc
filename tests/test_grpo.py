"""SIRI's GRPO method: log-probs at the response positions, the scheduled cap reaching generation,
ratio 1 on the first pass, a normaliser that ignores the cap, micro-batching, dynamic sampling,
resume, and the config checks. Rewards are injected (a random tiny model earns none); the policy
update is also called on its own, on rollouts of the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import alternating_reward, read_metrics, recorded_run, same_weights, snapshot, tiny_run

from crisp.config import ConfigError, SamplingConfig, dump_config, load_config, validate
from crisp.data import synthetic
from crisp.driver import train
from crisp.evaluate import score_rollouts
from crisp.losses import SurrogateSpec
from crisp.methods.grpo import Groups, GRPOConfig, StepPlan, policy_update, step_plan, token_logprobs
from crisp.modeling import load_model
from crisp.optim import step_if_finite
from crisp.prompts import PromptBuilder
from crisp.rollout import HFGenerator
from crisp.schedules import max_length_at
from crisp.teacher import Teacher


def make_cfg(model_dir, out, **overrides) -> GRPOConfig:
    settings = {
        "batch_size": 2,
        "group_size": 4,
        "micro_batch_size": 3,
        "chunk_size": 5,
        "rollout": {"temperature": 1.0, "top_p": 1.0, "top_k": 0},
        "schedule": {"kind": "constant", "l_min": 6, "l_max": 12, "period": 2},
    }
    return tiny_run("grpo", model_dir, out, settings, overrides)


@pytest.fixture()
def groups(tiny_model, tiny_tokenizer) -> Groups:
    """Two groups of 4 rollouts of the tiny model (up to 12 tokens), rewarded every other one."""
    builder = PromptBuilder(tiny_tokenizer, template="plain")
    problems = synthetic.train_problems(0, 64, (1, 2, 3, 4))[:2]
    sampling = SamplingConfig(n=4, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=12)
    rollouts = HFGenerator(tiny_model, tiny_tokenizer).generate(
        [builder.student_ids(p) for p in problems], sampling, seed=0
    )
    graded = score_rollouts(problems, rollouts, "exact")
    return Groups(graded, alternating_reward(graded, 12))


def update(
    model,
    groups: Groups,
    spec: SurrogateSpec = SurrogateSpec(),
    *,
    optimizer_step,
    micro_batch_size=3,
    ppo_epochs=1,
    reference=None,
):
    """policy_update as the GRPO method calls it, on the tiny model, with `optimizer_step` as the update."""
    normaliser = None if spec.aggregation == "sequence" else 2 * 4 * 12.0
    return policy_update(
        model,
        groups,
        spec,
        optimizer_step,
        reference=reference,
        normaliser=normaliser,
        group_size=4,
        scale_by_std=True,
        ppo_epochs=ppo_epochs,
        micro_batch_size=micro_batch_size,
        chunk_size=5,
        pad_id=0,
    )


def recording_grads(model, recorded: list):
    """An optimizer step that only records the accumulated gradients, then clears them."""

    def optimizer_step(loss):
        recorded.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
        return 0.0

    return optimizer_step


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
# the policy update on its own
# ---------------------------------------------------------------------------------------------


def test_first_pass_ratio_is_one(tiny_model, groups):
    """The old log-probs recorded before the first pass equal its own; the second pass (after one
    optimizer step on the same rollouts) differs from the old ones, which are recorded once."""
    optimizer = torch.optim.AdamW(tiny_model.parameters(), lr=1e-2)
    result = update(
        tiny_model,
        groups,
        ppo_epochs=2,
        optimizer_step=lambda loss: step_if_finite(tiny_model, optimizer, loss, 1.0)[0],
    )
    first, second = result.passes
    assert first["ratio_mean"] == 1.0 and first["clip_frac_low"] == first["clip_frac_high"] == 0.0
    assert second["ratio_mean"] != pytest.approx(1.0, abs=1e-6)
    assert result.updated_rollouts == 8 and math.isfinite(result.loss)


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_micro_batches_give_the_full_batch_gradient(tiny_model, groups, aggregation):
    recorded = []
    for size in (1, 8):
        update(
            tiny_model,
            groups,
            SurrogateSpec(aggregation=aggregation),
            micro_batch_size=size,
            optimizer_step=recording_grads(tiny_model, recorded),
        )
    micro, full = recorded
    assert any(g.abs().max() > 0 for g in full.values())
    for name in full:
        torch.testing.assert_close(micro[name], full[name], rtol=1e-4, atol=1e-7)


def test_zero_advantage_rollouts_are_skipped_without_changing_the_gradient(tiny_model, groups):
    """Group 0's rewards all agree (zero advantages). Without a KL term its rollouts are left out of
    the update; with kl_coef > 0 every rollout goes through, but the reference is the policy itself
    and the k3 term has a zero gradient, so both gradients must agree."""
    groups.rewards = [1.0] * 4 + [1.0, 0.0] * 2
    recorded = []
    skipped = update(tiny_model, groups, optimizer_step=recording_grads(tiny_model, recorded))
    full = update(
        tiny_model,
        groups,
        SurrogateSpec(kl_coef=1.0),
        reference=Teacher(tiny_model, update="frozen"),
        optimizer_step=recording_grads(tiny_model, recorded),
    )
    assert (skipped.updated_rollouts, full.updated_rollouts) == (4, 8)
    assert "kl" in full.passes[0] and "kl" not in skipped.passes[0]
    for name in recorded[1]:
        torch.testing.assert_close(recorded[0][name], recorded[1][name], rtol=1e-4, atol=1e-7)


def test_an_update_without_mixed_groups_steps_nothing(tiny_model, groups):
    groups.rewards = [0.0] * 8
    asked = []
    result = update(tiny_model, groups, ppo_epochs=2, optimizer_step=lambda loss: asked.append(loss) or math.nan)
    assert asked == [None, None] and result.updated_rollouts == 0 and math.isnan(result.loss)
    assert all(p.grad is None for p in tiny_model.parameters())


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------


def test_two_step_run_changes_the_parameters(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    final = train(
        make_cfg(
            tiny_model_dir, out, **{"eval.benchmark": "synthetic", "eval.limit": 2, "eval.sampling.max_new_tokens": 4}
        ),
        reward=alternating_reward,
    )
    assert final == out / "model"
    assert not same_weights(snapshot(load_model(str(final))), snapshot(load_model(str(tiny_model_dir))))
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


def test_scheduled_cap_reaches_generation_and_the_normaliser_ignores_it(tiny_model_dir, tmp_path):
    schedule = {"kind": "stair", "l_min": 3, "l_max": 9, "period": 2}
    training, recorder = recorded_run(
        make_cfg(tiny_model_dir, tmp_path / "run", max_steps=4, schedule=schedule), reward=alternating_reward
    )
    training.run()
    expected = [max_length_at(t, **schedule) for t in range(4)]
    assert expected == [3, 9, 3, 9]
    assert [call["max_new_tokens"] for call in recorder.calls] == expected
    for call in recorder.calls:
        assert all(r.num_tokens <= call["max_new_tokens"] for r in call["rollouts"])
    metrics = read_metrics(tmp_path / "run")
    assert [m["rollout/max_len"] for m in metrics] == expected
    # the token-level loss is divided by batch_size * group_size * l_max whatever this step's cap is
    assert [m["train/loss_normaliser"] for m in metrics] == [72.0] * 4


def test_dynamic_sampling_keeps_only_groups_with_mixed_rewards(tiny_model_dir, tmp_path):
    def rewards(graded, cap):
        return [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0]  # group 0 all right (no signal), group 1 mixed

    train(
        make_cfg(tiny_model_dir, tmp_path / "run", max_steps=1, dynamic_sampling=True, max_sampling_rounds=2),
        reward=rewards,
    )
    (m,) = read_metrics(tmp_path / "run")
    assert m["rollout/sampling_rounds"] == 2 and m["rollout/train_groups"] == 2
    assert m["rollout/mixed_group_fraction"] == 0.5


def test_a_step_without_mixed_groups_makes_no_update_and_is_not_a_failure(tiny_model_dir, tmp_path):
    final = train(
        make_cfg(tiny_model_dir, tmp_path / "run", dynamic_sampling=True, max_skipped_steps=1),
        reward=lambda graded, cap: [0.0] * len(graded),
    )
    assert same_weights(snapshot(load_model(str(final))), snapshot(load_model(str(tiny_model_dir))))
    for m in read_metrics(tmp_path / "run"):
        assert m["rollout/train_groups"] == 0 and m["train/skipped_steps"] == 0


def test_extending_a_finished_run_redoes_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    train(make_cfg(tiny_model_dir, out, save_every=1), reward=alternating_reward)
    first = read_metrics(out)
    final = train(make_cfg(tiny_model_dir, out, max_steps=3, save_every=1, resume="auto"), reward=alternating_reward)
    resumed = read_metrics(out)
    assert [m["step"] for m in resumed] == [1, 2, 3]
    assert resumed[:2] == first  # the last step was checkpointed: not redone, timings included
    straight = train(make_cfg(tiny_model_dir, tmp_path / "straight", max_steps=3), reward=alternating_reward)
    a, b = snapshot(load_model(str(final))), snapshot(load_model(str(straight)))
    assert same_weights(a, b)


# ---------------------------------------------------------------------------------------------
# TFPI: staged caps and prompt modes
# ---------------------------------------------------------------------------------------------

# thinking-free stages of growing length, then a last one in thinking mode ("TFPI + RL")
STAGES = [
    {"max_length": 3, "steps": 2},
    {"max_length": 5, "steps": 1},
    {"max_length": 7, "steps": 2, "thinking_free": False},
]


def staged(**overrides) -> dict:
    return {"schedule": {"kind": "stages", "stages": STAGES}, "prompt.thinking_free": True, "max_steps": 5, **overrides}


def test_step_plan_follows_the_stages(tiny_model_dir, tmp_path):
    cfg = make_cfg(tiny_model_dir, tmp_path, **staged())
    plans = [step_plan(cfg, t) for t in range(5)]
    assert [p.cap for p in plans] == [3, 3, 5, 7, 7]
    assert [p.stage for p in plans] == [1, 1, 2, 3, 3]
    assert [p.stage_start for p in plans] == [True, False, True, True, False]
    assert [p.thinking_free for p in plans] == [True, True, True, False, False]
    assert (cfg.schedule.l_min, cfg.schedule.l_max, cfg.rollout.max_new_tokens) == (3, 7, 7)
    periodic = make_cfg(tiny_model_dir, tmp_path, **{"prompt.thinking_free": True})
    assert step_plan(periodic, 0) == StepPlan(12, True)  # no stage, the run's mode


def test_stages_reach_generation_and_prompts_and_are_logged(tiny_model_dir, tmp_path, tiny_tokenizer):
    training, recorder = recorded_run(
        make_cfg(tiny_model_dir, tmp_path / "run", log_every=10, **staged()), reward=alternating_reward
    )
    training.run()
    calls = [(call["max_new_tokens"], [tiny_tokenizer.decode(p) for p in call["prompts"]]) for call in recorder.calls]
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
    assert {m["train/loss_normaliser"] for m in metrics} == {2 * 4 * 7}


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
    cfg = validate(
        {
            "method": "grpo",
            "output_dir": "x",
            "max_steps": 2,
            "model": {"path": "m"},
            "schedule": {"kind": "stages", "stages": [{"max_length": 40, "steps": 1}, {"max_length": 80, "steps": 1}]},
        }
    )
    assert (cfg.schedule.l_min, cfg.schedule.l_max, cfg.rollout.max_new_tokens) == (40, 80, 80)
    dump_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml", ["schedule.stages=[{max_length: 50, steps: 2}]"])
    assert (again.schedule.l_min, again.schedule.l_max, again.rollout.max_new_tokens) == (50, 50, 50)
    assert load_config(tmp_path / "config.yaml") == cfg


def test_rollout_takes_group_size_and_l_max_and_the_dump_reloads(tmp_path):
    cfg = validate(
        {
            "method": "grpo",
            "output_dir": "x",
            "max_steps": 1,
            "model": {"path": "m"},
            "group_size": 6,
            "schedule": {"l_min": 50, "l_max": 90},
            "rollout": {"temperature": 0.7, "n": 6},
        }
    )
    assert (cfg.rollout.n, cfg.rollout.max_new_tokens, cfg.rollout.temperature) == (6, 90, 0.7)
    dump_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml", ["group_size=3", "schedule.l_max=120"])
    assert (again.rollout.n, again.rollout.max_new_tokens, again.rollout.temperature) == (3, 120, 0.7)


def test_siri_configs_load():
    root = Path(__file__).resolve().parents[1] / "configs"
    for path in (root / "recipes" / "siri-r1-distill-qwen-1.5b.yaml", root / "demo" / "siri.yaml"):
        cfg = load_config(path)
        assert cfg.method == "grpo" and cfg.schedule.l_min <= cfg.schedule.l_max
