"""The tiny word-level tokenizer and model (an ordinary HF checkpoint) and the prompt builders."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from conftest import TINY
from transformers import AutoModelForCausalLM, AutoTokenizer

from crisp.data import synthetic
from crisp.data.problems import Problem
from crisp.modeling import IM_END, IM_START, build_tiny_model, load_model, load_tokenizer, save_model
from crisp.prompts import (
    INSTRUCTIONS,
    REFERENCE_TEMPLATE,
    STUDENT_TEMPLATES,
    PromptBuilder,
    resolve_instruction,
)

PROBLEM = synthetic.to_problem(synthetic.Chain(7, (3, -8, 5)), 0, "t")


def _traces(count: int) -> list[str]:
    rng = random.Random(0)
    texts = []
    for chain in synthetic.train_chains(seed=0, count=count):
        texts.append(chain.question())
        for style in synthetic.STYLES.values():
            texts.append(synthetic.sample_response(rng, chain, style).text)
    return texts


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------


def test_decode_encode_round_trip_on_synthetic_traces(tiny_tokenizer):
    for text in _traces(100):
        ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tiny_tokenizer.unk_token_id not in ids, text
        assert tiny_tokenizer.decode(ids) == text


@pytest.mark.parametrize("piece", [" -8", " +3", " +9", " -1", " +20"])
def test_signed_operand_is_one_token(tiny_tokenizer, piece):
    ids = tiny_tokenizer(piece, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1
    assert ids[0] != tiny_tokenizer.unk_token_id
    assert tiny_tokenizer.decode(ids) == piece


def test_operation_line_tokens(tiny_tokenizer):
    ids = tiny_tokenizer("Step 3: 12 -8 = 4.", add_special_tokens=False)["input_ids"]
    pieces = [tiny_tokenizer.decode([i]) for i in ids]
    assert " -8" in pieces and " 12" in pieces and " 4" in pieces


def test_special_tokens(tiny_tokenizer):
    assert tiny_tokenizer.eos_token == IM_END
    assert tiny_tokenizer.pad_token_id is not None and tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.padding_side == "left"
    assert len(tiny_tokenizer(IM_START, add_special_tokens=False)["input_ids"]) == 1


def test_chat_template_round_trip(tiny_tokenizer):
    messages = [
        {"role": "system", "content": "Let me think step by step."},
        {"role": "user", "content": PROBLEM.question},
    ]
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith(f"{IM_START}assistant\n")
    assert PROBLEM.question in text and "Let me think step by step." in text
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.unk_token_id not in ids
    assert tiny_tokenizer.decode(ids) == text
    without = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert text == without + f"{IM_START}assistant\n"


def test_builder_render_ends_with_generation_prompt(tiny_tokenizer):
    builder = PromptBuilder(tiny_tokenizer, template="plain")
    ids = builder.student_ids(PROBLEM)
    text = tiny_tokenizer.decode(ids)
    assert text == builder.render(PROBLEM.question)
    assert text.endswith(f"{IM_START}assistant\n")
    assert text.startswith(f"{IM_START}user\n{PROBLEM.question}{IM_END}")


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------


def test_save_and_reload_gives_identical_logits(tiny_tokenizer, tmp_path):
    model = build_tiny_model(tiny_tokenizer, seed=3, **TINY).eval()
    save_model(model, tiny_tokenizer, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    text = PromptBuilder(tiny_tokenizer, template="plain").render(PROBLEM.question)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert ids.tolist()[0] == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[0]) == text
    assert tokenizer.chat_template == tiny_tokenizer.chat_template
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    # crisp's own loaders give the same model and a left-padding tokenizer
    assert load_tokenizer(str(tmp_path)).padding_side == "left"
    with torch.no_grad():
        assert torch.equal(load_model(str(tmp_path)).eval()(ids).logits, model(ids).logits)


def test_tiny_model_seed_changes_weights(tiny_tokenizer):
    a = build_tiny_model(tiny_tokenizer, seed=0, **TINY)
    b = build_tiny_model(tiny_tokenizer, seed=0, **TINY)
    c = build_tiny_model(tiny_tokenizer, seed=1, **TINY)
    wa, wb, wc = (m.get_input_embeddings().weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


@pytest.mark.parametrize("architecture", ["llama", "qwen3"])
def test_build_tiny_model_architectures(tiny_tokenizer, architecture, tmp_path):
    model = build_tiny_model(tiny_tokenizer, architecture=architecture, **TINY).eval()
    assert model.config.model_type == architecture
    assert model.config.vocab_size == len(tiny_tokenizer)
    assert model.config.tie_word_embeddings
    ids = torch.tensor([tiny_tokenizer(PROBLEM.question, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tiny_tokenizer))
    assert torch.isfinite(logits).all()
    save_model(model, tiny_tokenizer, tmp_path)
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path).eval()(ids).logits, logits)


def test_build_tiny_model_unknown_architecture(tiny_tokenizer):
    with pytest.raises(ValueError, match="architecture"):
        build_tiny_model(tiny_tokenizer, architecture="gpt2", **TINY)


def test_load_model_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


# ---------------------------------------------------------------------------------------------
# prompt builder
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["dapo", "plain", "Let me think.\n{question}\nAnswer:"])
def test_teacher_text_is_instruction_then_student_text(tiny_tokenizer, template):
    builder = PromptBuilder(tiny_tokenizer, template=template)
    student = builder.student_text(PROBLEM)
    assert PROBLEM.question in student
    instruction = resolve_instruction("v1")
    assert builder.teacher_text(PROBLEM, instruction=instruction, reference=False) == instruction + "\n\n" + student
    assert builder.teacher_text(PROBLEM, instruction=None, reference=True) != student
    teacher_ids = builder.teacher_ids(PROBLEM, instruction=instruction)
    assert tiny_tokenizer.decode(teacher_ids) == builder.render(instruction + "\n\n" + student)


def test_student_templates(tiny_tokenizer):
    assert PromptBuilder(tiny_tokenizer, template="plain").student_text(PROBLEM) == PROBLEM.question
    dapo = PromptBuilder(tiny_tokenizer, template="dapo").student_text(PROBLEM)
    assert dapo == STUDENT_TEMPLATES["dapo"].replace("{question}", PROBLEM.question)
    with pytest.raises(ValueError, match="question"):
        PromptBuilder(tiny_tokenizer, template="no placeholder").student_text(PROBLEM)


def test_question_with_braces_is_not_formatted(tiny_tokenizer):
    problem = Problem(id="b", question="Find {x} if \\frac{1}{2} = x.", answer="1/2", solution="x = {1/2}")
    builder = PromptBuilder(tiny_tokenizer, template="dapo")
    assert problem.question in builder.student_text(problem)
    text = builder.teacher_text(problem, instruction="v", reference=True)
    assert problem.question in text and problem.solution in text


def test_opsd_reference_template(tiny_tokenizer):
    builder = PromptBuilder(tiny_tokenizer, template="plain")
    text = builder.teacher_text(PROBLEM, instruction=None, reference=True)
    assert PROBLEM.solution in text
    assert text.count(PROBLEM.question) == 2  # before the solution and again after it
    assert text.index(PROBLEM.question) < text.index(PROBLEM.solution) < text.rindex(PROBLEM.question)
    assert text == REFERENCE_TEMPLATE.format(question=PROBLEM.question, solution=PROBLEM.solution)
    both = builder.teacher_text(PROBLEM, instruction="Be brief.", reference=True)
    assert both == "Be brief.\n\n" + text
    ids = builder.teacher_ids(PROBLEM, instruction=None, reference=True)
    assert tiny_tokenizer.unk_token_id not in ids
    assert tiny_tokenizer.decode(ids) == builder.render(text)


def test_reference_teacher_needs_a_solution(tiny_tokenizer):
    builder = PromptBuilder(tiny_tokenizer, template="plain")
    problem = Problem(id="no-sol", question="Start with 3.\nFirst +2\nWhat is the result?", answer="5")
    with pytest.raises(ValueError, match="no-sol"):
        builder.teacher_text(problem, instruction=None, reference=True)
    with pytest.raises(ValueError, match="reference solution"):
        builder.teacher_ids(problem, instruction="v1", reference=True)
    # an instruction-only teacher does not need one
    assert builder.teacher_text(problem, instruction="Be brief.", reference=False).startswith("Be brief.")


def test_resolve_instruction_presets_and_custom_text():
    assert resolve_instruction("v1") == INSTRUCTIONS["v1"]
    assert resolve_instruction("v2") == INSTRUCTIONS["v2"]
    assert resolve_instruction("v1") != resolve_instruction("v2")
    percent = resolve_instruction("percent", percent=30)
    assert "30%" in percent and "{" not in percent
    assert resolve_instruction("percent", percent=70) == percent.replace("30%", "70%")
    words = resolve_instruction("word_limit", words=42)
    assert "42 words" in words and "{" not in words
    custom = "Answer in {one} line."  # custom text is taken literally, braces and all
    assert resolve_instruction(custom) == custom
    assert resolve_instruction(None) is None and resolve_instruction("") is None


THINKING_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant' }}"
    "{% if enable_thinking is defined %}{{ ' thinking=' + (enable_thinking | string) }}"
    "{% else %}{{ ' thinking=unset' }}{% endif %}{% endif %}"
)


@pytest.mark.parametrize("flag", [True, False, None])
def test_enable_thinking_reaches_the_template_for_student_and_teacher(tiny_tokenizer, flag):
    tokenizer = copy.deepcopy(tiny_tokenizer)  # keep the session tokenizer's template intact
    tokenizer.chat_template = THINKING_TEMPLATE
    builder = PromptBuilder(tokenizer, template="plain", enable_thinking=flag, system="sys")
    expected = "thinking=unset" if flag is None else f"thinking={flag}"
    student = builder.render(builder.student_text(PROBLEM))
    teacher = builder.render(builder.teacher_text(PROBLEM, instruction="Be brief.", reference=True))
    for text in (student, teacher):
        assert text.startswith("system: sys\nuser: ")
        assert text.endswith("assistant " + expected)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    assert builder.student_ids(PROBLEM) == encode(student)
    assert builder.teacher_ids(PROBLEM, instruction="Be brief.", reference=True) == encode(teacher)
    assert tiny_tokenizer.chat_template != THINKING_TEMPLATE
