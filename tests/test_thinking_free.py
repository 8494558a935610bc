"""Thinking-free prompts (TFPI's ThinkFree operation) against the real chat templates, and proof
that the appended closed thinking block is prompt: never in a response, a loss mask or a count.

The templates are TRL's copies of the Hub templates (trl/chat_templates/*.jinja, checked against
the Hub by TRL's CI), set on the tiny tokenizer: no download.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
from pathlib import Path

import pytest
import yaml
from conftest import TINY, alternating_reward, eval_argv, read_metrics, recorded_run
from test_grpo import make_cfg
from test_sft import make_cfg as make_sft_cfg

from crisp import cli
from crisp.config import PromptConfig, SamplingConfig
from crisp.data import synthetic
from crisp.data.tasks import get_task
from crisp.methods.grpo import rollout_logprobs
from crisp.methods.sft import collate
from crisp.modeling import build_tiny_model, save_model
from crisp.prompts import CLOSED_THINKING, PromptBuilder
from crisp.rollout import HFGenerator

PROBLEM = synthetic.test_problems()[0]


def trl_template(name: str) -> str:
    return (importlib.resources.files("trl") / "chat_templates" / f"{name}.jinja").read_text()


@pytest.fixture()
def tokenizer_with(tiny_tokenizer):
    """The tiny tokenizer with a given chat template (a copy: the session tokenizer stays as it is)."""

    def make(template: str, name: str = "tiny"):
        tokenizer = copy.deepcopy(tiny_tokenizer)
        tokenizer.chat_template = template
        tokenizer.name_or_path = name
        return tokenizer

    return make


@pytest.mark.parametrize("system", [None, "You are a careful solver."])
def test_qwen3_thinking_free_equals_the_templates_own_enable_thinking_false(tokenizer_with, system):
    tokenizer = tokenizer_with(trl_template("qwen3"))
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": PROBLEM.question}
    ]
    own = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    thinking = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert own == thinking + CLOSED_THINKING  # the template's no-think branch is exactly the appended text

    for enable_thinking in (None, True, False):  # whatever the template flag says, one closed block
        builder = PromptBuilder(
            tokenizer, template="plain", system=system, enable_thinking=enable_thinking, thinking_free=True
        )
        assert builder.render(PROBLEM.question) == own
        assert builder.student_ids(PROBLEM) == tokenizer(own, add_special_tokens=False)["input_ids"]
        assert builder.thinking_mode == "thinking_free"
    assert PromptBuilder(tokenizer, template="plain", system=system).render(PROBLEM.question) == thinking


def test_r1_distill_gets_its_opened_block_closed_not_a_second_one(tokenizer_with):
    tokenizer = tokenizer_with(trl_template("deepseek_r1_distill"))
    thinking = PromptBuilder(tokenizer, template="plain").render(PROBLEM.question)
    assert thinking.endswith("<｜Assistant｜><think>\n")  # its generation prompt opens the block
    free = PromptBuilder(tokenizer, template="plain", thinking_free=True).render(PROBLEM.question)
    assert free == thinking + "\n</think>\n\n"
    assert free.endswith("<｜Assistant｜>" + CLOSED_THINKING)
    assert free.count("<think>") == 1 and free.count("</think>") == 1


@pytest.mark.parametrize("name", ["llama3", "qwen2_5"])
def test_a_template_without_thinking_is_an_error_naming_the_model(tokenizer_with, name):
    template = trl_template(name)
    assert "<think>" not in template and "</think>" not in template
    tokenizer = tokenizer_with(template, name=f"org/{name}-model")
    with pytest.raises(ValueError, match=f"org/{name}-model.*no thinking convention"):
        PromptBuilder(tokenizer, template="plain", thinking_free=True).render(PROBLEM.question)


def test_the_tiny_template_student_and_teacher_agree(tiny_tokenizer):
    builder = PromptBuilder.from_config(tiny_tokenizer, PromptConfig(template="plain", thinking_free=True))
    own = PromptBuilder(tiny_tokenizer, template="plain", enable_thinking=False)
    assert builder.render(PROBLEM.question) == own.render(PROBLEM.question)
    for ids in (
        builder.student_ids(PROBLEM),
        builder.teacher_ids(PROBLEM, instruction="v1"),
        builder.teacher_ids(PROBLEM, instruction=None, reference=True),
    ):
        assert tiny_tokenizer.decode(ids).endswith("<|im_start|>assistant\n" + CLOSED_THINKING)
    # the closed block is four tokens at the end of the prompt: <think> \n\n </think> \n\n
    plain = PromptBuilder(tiny_tokenizer, template="plain").student_ids(PROBLEM)
    free = builder.student_ids(PROBLEM)
    assert free[: len(plain)] == plain and len(free) == len(plain) + 4


def test_sft_trains_on_the_response_only_not_on_the_appended_block(tiny_tokenizer, tmp_path):
    only_free = {"plain": 0.0, "v1": 0.0, "v2": 0.0, "reference": 0.0, "thinking_free": 1.0}
    cfg = make_sft_cfg(tmp_path, mix=only_free)
    builder = PromptBuilder(tiny_tokenizer, template="plain")
    free = get_task("synthetic").sft_examples(cfg, builder)[:16]
    _, _, labels = collate(free, tiny_tokenizer.pad_token_id)  # (B, T)
    for row, example in enumerate(free):
        assert tiny_tokenizer.decode(example.prompt_ids).endswith(CLOSED_THINKING)
        response = tiny_tokenizer.decode(example.response_ids)
        assert response.startswith("First ") and "<think>" not in response and "</think>" not in response
        assert all(example.loss_mask)  # every response token, and only those
        assert labels[row, : len(example.prompt_ids)].eq(-100).all()  # no label on the prompt, closed block included
        assert labels[row, len(example.prompt_ids) :].ne(-100).sum() == len(example.response_ids)


def test_grpo_trains_and_counts_the_response_only(tiny_model_dir, tmp_path, tiny_tokenizer):
    """Rollouts from thinking-free prompts: the closed block ends every prompt and starts no response,
    the log-prob mask of every rollout covers exactly its response tokens, and rollout/mean_tokens
    counts those alone. Moving the block into the response (e.g. forcing it as the first generated
    tokens) fails each of these."""
    cfg = make_cfg(tiny_model_dir, tmp_path / "run", max_steps=1, micro_batch_size=8, **{"prompt.thinking_free": True})
    training, recorder = recorded_run(cfg, reward=alternating_reward)
    training.run()
    (call,) = recorder.calls
    rollouts = call["rollouts"]
    builder = PromptBuilder(tiny_tokenizer, template="plain", thinking_free=True)
    closed = tiny_tokenizer(CLOSED_THINKING, add_special_tokens=False)["input_ids"]
    for r in rollouts:
        assert tiny_tokenizer.decode(r.prompt_ids).endswith(CLOSED_THINKING)
        assert list(r.prompt_ids[-len(closed) :]) == closed and list(r.token_ids[: len(closed)]) != closed
    assert {tuple(builder.student_ids(p)) for p in synthetic.train_problems(0, 64, (1, 2, 3, 4))} >= {
        r.prompt_ids for r in rollouts
    }
    _, mask = rollout_logprobs(training.method.model, rollouts, tiny_tokenizer.pad_token_id, chunk_size=5)
    assert mask.sum(dim=1).tolist() == [r.num_tokens for r in rollouts]
    (metrics,) = read_metrics(tmp_path / "run")
    assert metrics["rollout/mean_tokens"] == sum(r.num_tokens for r in rollouts) / len(rollouts)
    assert metrics["train/updated_rollouts"] == len(rollouts)  # the update trained on these very rollouts


# ---------------------------------------------------------------------------------------------
# evaluation in both modes
# ---------------------------------------------------------------------------------------------

EVAL_FLAGS = "--benchmark synthetic --limit 6 --k 2 --max-new-tokens 6 --seed 1"


def read_eval(out: Path) -> tuple[dict, list[dict]]:
    summary = json.loads((out / "summary.json").read_text())
    return summary, [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_eval_thinking_free_counts_the_responses_of_thinking_free_prompts(
    tiny_model_dir, tiny_model, tiny_tokenizer, tmp_path
):
    out = tmp_path / "free"
    cli.main(eval_argv(tiny_model_dir, out, EVAL_FLAGS, "--thinking-free"))
    summary, samples = read_eval(out)
    assert summary["thinking_mode"] == "thinking_free"
    # the same sampler on the thinking-free prompts: the records are exactly its responses
    builder = PromptBuilder(tiny_tokenizer, template="plain", thinking_free=True)
    sampling = SamplingConfig(n=2, temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=6)
    rollouts = HFGenerator(tiny_model, tiny_tokenizer).generate(
        [builder.student_ids(p) for p in synthetic.test_problems()[:6]], sampling, seed=1
    )
    assert [s["tokens"] for s in samples] == [r.num_tokens for r in rollouts]
    assert [s["response"] for s in samples] == [r.text for r in rollouts]
    assert summary["mean_tokens"] == sum(r.num_tokens for r in rollouts) / len(rollouts)


def test_eval_in_both_modes_side_by_side_each_against_its_own_baseline(tiny_model_dir, tmp_path, capsys):
    single = {}
    for mode, flags in (("thinking", []), ("thinking_free", ["--thinking-free"])):
        cli.main(eval_argv(tiny_model_dir, tmp_path / mode, EVAL_FLAGS, *flags))
        single[mode] = read_eval(tmp_path / mode)
    assert single["thinking"][0]["thinking_mode"] == "thinking"
    assert single["thinking"][1] != single["thinking_free"][1]  # the prompt mode changes the samples
    capsys.readouterr()

    both = tmp_path / "both"
    cli.main(eval_argv(tiny_model_dir, both, EVAL_FLAGS, "--modes", "thinking,thinking_free"))
    printed = capsys.readouterr().out
    name = tiny_model_dir.name
    assert f"{name} (thinking)" in printed and f"{name} (thinking_free)" in printed
    for mode in ("thinking", "thinking_free"):
        summary, samples = read_eval(both / mode)
        assert summary["thinking_mode"] == mode and samples == single[mode][1]

    again = tmp_path / "again"  # a baseline evaluated in both modes: each mode against the same mode
    cli.main(eval_argv(tiny_model_dir, again, EVAL_FLAGS, "--modes", "thinking,thinking_free", "--baseline", str(both)))
    for mode in ("thinking", "thinking_free"):
        assert read_eval(again / mode)[0]["vs_baseline"]["overall"]["compression_ratio"] == 1.0
    assert "baseline (thinking_free)" in capsys.readouterr().out


def test_eval_config_modes_write_a_folder_per_benchmark_and_mode(tiny_model_dir, tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"path": str(tiny_model_dir)},
                "benchmarks": ["synthetic"],
                "output_dir": str(tmp_path / "out"),
                "k": 1,
                "limit": 2,
                "sampling": {"max_new_tokens": 4},
                "prompt": {"template": "plain"},
                "modes": ["thinking_free", "thinking"],
            }
        )
    )
    cli.main(["eval", "--config", str(config)])
    for mode in ("thinking", "thinking_free"):
        assert read_eval(tmp_path / "out" / "synthetic" / mode)[0]["thinking_mode"] == mode


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--modes", "thinking,thinking_free", "--thinking-free"], "modes: set modes or prompt.thinking_free"),
        (["--modes", "thinking,thinking"], "modes: each mode once"),
        (["--modes", "fast"], "modes.0"),
        (["--modes", "thinking,thinking_free", "--enable-thinking", "false"], "every mode thinking-free"),
    ],
)
def test_eval_mode_flag_errors_exit_2(tiny_model_dir, tmp_path, capsys, flags, named):
    with pytest.raises(SystemExit) as info:
        cli.main(eval_argv(tiny_model_dir, tmp_path / "x", EVAL_FLAGS, *flags))
    assert info.value.code == 2 and named in capsys.readouterr().err


def test_eval_thinking_free_of_a_model_without_thinking_exits_2_naming_it(tiny_tokenizer, tmp_path, capsys):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = trl_template("qwen2_5")
    model_dir = tmp_path / "no-thinking-model"
    save_model(build_tiny_model(tokenizer, seed=0, **TINY), tokenizer, model_dir)
    with pytest.raises(SystemExit) as info:
        cli.main(eval_argv(model_dir, tmp_path / "x", EVAL_FLAGS, "--thinking-free"))
    assert info.value.code == 2
    assert f"{model_dir}" in (err := capsys.readouterr().err) and "no thinking convention" in err
