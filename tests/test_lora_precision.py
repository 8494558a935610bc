"""LoRA, gradient checkpointing and bf16 autocast.

With LoRA the self-distillation teacher is the same base model with another adapter: its logits
must equal those of an explicit full copy kept by the plain update rule, for every teacher mode.
Gradient checkpointing must recompute without changing a gradient; bf16 autocast must compute in
bf16 while the weights stay fp32. End to end: a LoRA run trains only a low-rank update, saves a
merged model and resumes exactly.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import parity_reward, read_metrics
from test_grpo import make_cfg as grpo_cfg
from test_resume import assert_bitwise_equal, weights
from test_selfdistill import make_cfg

from crisp.config import LoraSpec
from crisp.data import synthetic
from crisp.distributed import autocast
from crisp.driver import train
from crisp.modeling import eval_mode, prepare_for_training, response_hidden
from crisp.prompts import PromptBuilder, resolve_instruction
from crisp.teacher import Teacher

LORA = LoraSpec(r=4, alpha=8)


@pytest.fixture()
def sequences(tiny_tokenizer):
    """Teacher prompts (with the v1 instruction) and responses of different lengths."""
    builder = PromptBuilder(tiny_tokenizer, template="plain")
    problems = synthetic.test_problems()[::50]
    prompts = [builder.teacher_ids(p, instruction=resolve_instruction("v1")) for p in problems]
    responses = [
        tiny_tokenizer(p.solution, add_special_tokens=False)["input_ids"][: 4 + 3 * k] for k, p in enumerate(problems)
    ]
    return prompts, responses


def lora_params(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".lora_" in n and ".default." in n}


def train_step(student, step: int) -> None:
    """What an optimizer step does to a LoRA student: only its adapter ("default") weights move."""
    generator = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for p in lora_params(student).values():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)


def full_model_log_probs(model, prompts, responses) -> torch.Tensor:
    """log_softmax of a whole model's logits at the response positions, one sequence at a time."""
    rows = []
    with torch.no_grad():
        for prompt, response in zip(prompts, responses):
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0]  # (T, V)
            rows.append(logits[len(prompt) - 1 : len(prompt) - 1 + len(response)])
    return F.log_softmax(torch.cat(rows).double(), dim=-1)  # (N, V)


@pytest.mark.parametrize("update", ["frozen", "refresh", "ema", "live"])
def test_adapter_teacher_equals_an_explicit_full_copy(tiny_model, tiny_tokenizer, sequences, update):
    prompts, responses = sequences
    student = prepare_for_training(tiny_model, lora=LORA).train()
    teacher = Teacher(student, update=update, refresh_every=3, ema_decay=0.7)
    assert teacher.model is student and not teacher.owns_weights  # one base model in memory
    explicit = copy.deepcopy(student).eval()  # the rule applied to a whole copy, by hand
    for step in range(1, 5):
        train_step(student, step)
        teacher.after_step(step, student)
        with torch.no_grad():
            if update == "refresh" and step % 3 == 0:
                explicit.load_state_dict(student.state_dict())
            if update == "ema":
                for e, s in zip(explicit.parameters(), student.parameters()):
                    e.lerp_(s, 1 - 0.7)
        reference = student if update == "live" else explicit
        with torch.no_grad():
            hidden = teacher.hidden(prompts, responses, tiny_tokenizer.pad_token_id)  # (N, H)
            got = F.log_softmax(teacher.head(hidden).double(), dim=-1)
        with eval_mode(reference):
            want = full_model_log_probs(reference, prompts, responses)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the student's own adapter moved away from the teacher's, so the comparison was not trivial
    if update != "live":
        with eval_mode(student):
            assert not torch.allclose(got, full_model_log_probs(student, prompts, responses), atol=1e-3)
    # the teacher ran in eval mode and gave the student back as it was: training, adapters trainable
    assert student.training
    assert all(p.requires_grad for p in lora_params(student).values())
    assert not any(p.requires_grad for n, p in student.named_parameters() if ".teacher." in n)
    assert teacher.refreshes == (1 if update == "refresh" else 0)


def test_lora_wraps_only_linear_layers_and_trains_only_adapters(tiny_model):
    total = sum(p.numel() for p in tiny_model.parameters())
    student = prepare_for_training(tiny_model, lora=LORA)
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(p.numel() for n, p in student.named_parameters() if ".lora_" not in n) == total
    assert not any("lm_head" in n or "embed" in n for n in trainable)


def test_lora_spec_rejects_the_shared_head():
    from crisp.config import ConfigError, validate

    with pytest.raises(ConfigError, match="lm_head"):
        validate(
            {
                "method": "selfdistill",
                "output_dir": "x",
                "max_steps": 1,
                "model": {"path": "m", "lora": {"target_modules": ["q_proj", "lm_head"]}},
            }
        )


# ---------------------------------------------------------------------------------------------
# gradient checkpointing and bf16 autocast
# ---------------------------------------------------------------------------------------------


def _loss_and_layer_calls(model, prompts, responses, pad_id):
    """The loss, and how many times the layers' MLPs started in forward and backward together (a
    pre-hook: the recomputation stops as soon as it has what backward needs, before a post-hook)."""
    calls = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda *_: calls.append(1)) for layer in model.model.layers]
    hidden = response_hidden(model, prompts, responses, pad_id)  # (N, H)
    loss = model.get_output_embeddings()(hidden).logsumexp(-1).mean()
    loss.backward()
    for hook in hooks:
        hook.remove()
    return loss.item(), len(calls)


def test_gradient_checkpointing_recomputes_without_changing_the_gradient(tiny_model, tiny_tokenizer, sequences):
    prompts, responses = sequences
    pad = tiny_tokenizer.pad_token_id
    plain = copy.deepcopy(tiny_model).train()
    checkpointed = prepare_for_training(tiny_model, gradient_checkpointing=True).train()
    loss_plain, calls_plain = _loss_and_layer_calls(plain, prompts, responses, pad)
    loss_ckpt, calls_ckpt = _loss_and_layer_calls(checkpointed, prompts, responses, pad)
    layers = len(plain.model.layers)
    assert (calls_plain, calls_ckpt) == (layers, 2 * layers)  # each layer runs again in backward
    assert loss_ckpt == pytest.approx(loss_plain, rel=1e-6)
    grads = dict(checkpointed.named_parameters())
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-5, atol=1e-7)


def test_bf16_autocast_computes_in_bf16_and_keeps_fp32_weights(tiny_model, tiny_tokenizer, sequences):
    prompts, responses = sequences
    pad = tiny_tokenizer.pad_token_id
    matmul_dtypes = []
    tiny_model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, out: matmul_dtypes.append(out.dtype))
    with torch.no_grad():
        full = response_hidden(tiny_model, prompts, responses, pad)  # (N, H)
        with autocast("bf16", torch.device("cpu")):
            half = response_hidden(tiny_model, prompts, responses, pad)  # (N, H)
        with autocast("no", torch.device("cpu")):
            off = response_hidden(tiny_model, prompts, responses, pad)  # (N, H)
    assert matmul_dtypes == [torch.float32, torch.bfloat16, torch.float32]
    assert all(p.dtype == torch.float32 for p in tiny_model.parameters())
    assert not torch.equal(half.float(), full)
    torch.testing.assert_close(half.float(), full, rtol=0.05, atol=0.05)
    torch.testing.assert_close(off, full)


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------


def test_lora_selfdistill_trains_a_low_rank_update_saves_merged_and_resumes(tiny_model_dir, tmp_path):
    common = {
        "model.lora": LORA.model_dump(),
        "teacher.update": "refresh",
        "teacher.refresh_every": 1,
        "save_every": 1,
        "mixed_precision": "bf16",
    }
    out = tmp_path / "run"
    train(make_cfg(tiny_model_dir, out, **common))
    first = read_metrics(out)
    checkpoint = out / "checkpoints" / "step-00000001" / "model"
    assert (checkpoint / "adapter_model.safetensors").is_file()  # the student's adapter
    assert (checkpoint / "teacher" / "adapter_model.safetensors").is_file()  # the teacher's, refreshed at step 1
    assert not (checkpoint / "model.safetensors").exists()  # a checkpoint holds adapters, not the base

    final = train(make_cfg(tiny_model_dir, out, max_steps=3, resume="auto", **common))
    resumed = read_metrics(out)
    assert [m["step"] for m in resumed] == [1, 2, 3] and resumed[:2] == first  # the last step was checkpointed
    assert (final / "adapter" / "adapter_model.safetensors").is_file()

    base, trained = weights(tiny_model_dir), weights(final)  # the final model is merged: a plain HF model
    assert trained.keys() == base.keys()
    changed = [k for k in base if not torch.equal(base[k], trained[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed)  # only the adapted linear layers
    for k in changed:
        assert torch.linalg.matrix_rank(trained[k] - base[k], atol=1e-6) <= LORA.r

    straight = train(make_cfg(tiny_model_dir, tmp_path / "straight", max_steps=3, **common))
    again = weights(straight)
    assert_bitwise_equal(trained, again)  # the adapters came back exactly


def test_lora_grpo_with_a_kl_term_to_the_adapter_free_base(tiny_model_dir, tmp_path):
    """The GRPO reference is the base model with the adapters off: no second copy, and the k3 KL
    starts at 0 (B = 0) and grows once the adapter has moved."""
    out = tmp_path / "run"
    final = train(
        grpo_cfg(tiny_model_dir, out, max_steps=2, kl_coef=0.5, ppo_epochs=2, **{"model.lora": LORA.model_dump()}),
        reward=parity_reward,
    )
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]
    assert 0 < metrics[-1]["train/kl"] < 1
    base, trained = weights(tiny_model_dir), weights(final)
    assert any(not torch.equal(base[k], trained[k]) for k in base)
    assert all(torch.equal(base[k], trained[k]) for k in base if not k.endswith("proj.weight"))
