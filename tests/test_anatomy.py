"""Reasoning anatomy on crafted responses, every figure counted by hand: the thinking/answer split in
token ids (Qwen3, R1-Distill, thinking-free, truncated, untagged), marker counts, the repetition-loop
rule, the aggregate rates, and a pathological 100k-character response in bounded time."""

from __future__ import annotations

import dataclasses
import json
import random
import time

import pytest
from conftest import eval_argv

from crisp.anatomy import (
    DEFAULT_MARKERS,
    anatomy_figures,
    count_markers,
    find_sequence,
    has_repetition_loop,
    prompt_leaves_thinking_open,
    response_anatomy,
    thinking_split,
)
from crisp.cli import main
from crisp.config import AnatomyConfig, ConfigError, EvalRunConfig, validate
from crisp.data import synthetic
from crisp.evaluate import add_anatomy, score_rollouts, summarize
from crisp.prompts import PromptBuilder
from crisp.rollout import Rollout

OPEN, CLOSE, EOS = 8, 9, 0  # token ids of <think>, </think> and the end of a response


def split(ids, *, prompt_open=False, text="", close=(CLOSE,), decode=None):
    return thinking_split(ids, close_ids=close, open_ids=(OPEN,), text=text, prompt_open=prompt_open, decode=decode)


@pytest.mark.parametrize(
    "ids, prompt_open, expected",
    [
        ([OPEN, 1, 2, 3, CLOSE, 4, 5, EOS], False, (5, 3)),  # Qwen3: <think> 1 2 3 </think> | 4 5 EOS
        ([OPEN, 7, CLOSE, 4, EOS], False, (3, 2)),  # an empty thinking section: the tags and a blank line
        ([1, 2, CLOSE, 4, EOS], True, (3, 2)),  # R1-Distill: the prompt opened it, the response only closes
        ([OPEN, 1, CLOSE, 2, CLOSE, EOS], False, (3, 3)),  # the first </think> ends the thinking
        ([OPEN, 1, 2, 3], False, (4, 0)),  # truncated inside its own thinking section: all thinking
        ([1, 2, 3], True, (3, 0)),  # truncated inside the prompt's section (no tag in the response)
        ([1, 2, EOS], False, (0, 3)),  # no tags, nothing open: all answer (also the thinking-free mode)
        ([], True, (0, 0)),
    ],
)
def test_thinking_split_by_hand(ids, prompt_open, expected):
    assert split(ids, prompt_open=prompt_open) == expected


def test_a_multi_token_tag_and_the_decoded_text_fallback():
    assert split([5, 1, 5, 6, 2], close=(5, 6)) == (4, 1)  # a 5 not followed by 6 is not the tag
    assert find_sequence([5, 6, 1, 5, 6], (5, 6), start=1) == 3 and find_sequence([1, 2], ()) == -1
    # the tag is in the text but not a token sequence of its own: the shortest prefix that decodes with it
    text = "ab</think>cd"
    ids = [ord(c) for c in text]
    decode = lambda part: "".join(map(chr, part))  # noqa: E731
    assert split(ids, text=text, close=(999,), decode=decode) == (10, 2)
    assert split(ids, text=text, close=(999,)) == (0, 12)  # without a decoder the tag is not found


def test_which_prompts_leave_thinking_open():
    assert prompt_leaves_thinking_open("<|im_start|>assistant\n<think>\n")  # R1-Distill: opened
    assert not prompt_leaves_thinking_open("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # thinking-free
    assert not prompt_leaves_thinking_open("<|im_start|>assistant\n")  # Qwen3: the response opens it
    assert prompt_leaves_thinking_open("<think></think> quoted, then <think>")  # the last tag counts


def test_count_markers_by_hand():
    text = (
        "Wait, hmm. But wait -- let me  check: I double-check; awaited, waiting, Hmm... ALTERNATIVELY. "
        "Let me\nverify. wait"
    )
    counts = count_markers(text, DEFAULT_MARKERS)
    assert list(counts) == list(DEFAULT_MARKERS)
    assert counts == {
        "wait": 2,
        "but wait": 1,
        "hmm": 2,
        "alternatively": 1,
        "let me check": 1,
        "let me verify": 1,
        "double-check": 1,
        "double check": 0,
        "re-read": 0,
    }
    assert count_markers(text, ["wait"]) == {"wait": 3}  # without "but wait" its "wait" counts
    assert count_markers(text, []) == {}
    assert count_markers("", DEFAULT_MARKERS)["wait"] == 0


def test_repetition_loop_rule():
    sentence = " ".join(f"w{i}" for i in range(20)) + "."  # 20 distinct words
    assert has_repetition_loop(sentence * 3) and not has_repetition_loop(sentence * 2)  # n = 20, k = 3
    assert has_repetition_loop("go " * 22) and not has_repetition_loop("go " * 21)  # 22 - 20 + 1 = 3 occurrences
    assert has_repetition_loop("x y z q x y z", ngram=3, repeats=2)
    assert not has_repetition_loop("x y z q x y w", ngram=3, repeats=2)
    assert has_repetition_loop("Wait. wait, WAIT", ngram=1, repeats=3)  # words are case- and punctuation-blind
    assert not has_repetition_loop("", ngram=1, repeats=1)
    # a verbose synthetic trace repeats short lines (checks, second-guesses), not a 20-word span 3 times
    chain = synthetic.test_chains()[-1]
    style = dataclasses.replace(synthetic.VERBOSE, reread=0.0, second_guess=1.0, check_safe=1.0, check_risky=1.0)
    trace = synthetic.sample_response(random.Random(0), chain, style).text
    assert trace.count("Hmm, wait: is") == 4 and trace.count("Check:") == 4
    assert not has_repetition_loop(trace)
    looping = dataclasses.replace(synthetic.VERBOSE, reread=1.0, reread_again=1.0)  # the re-read loop is one
    assert has_repetition_loop(synthetic.sample_response(random.Random(0), chain, looping).text)


def test_response_anatomy_of_a_qwen3_response():
    text = "<think>\nHmm, wait. Let me check.\n</think>\n\nAnswer: 4"
    ids = [OPEN, 1, 2, 3, 4, 5, CLOSE, 6, 7, 8, EOS]
    figures = response_anatomy(
        ids, text, close_ids=(CLOSE,), open_ids=(OPEN,), prompt_open=False, markers=["wait", "hmm", "let me check"]
    )
    assert figures == {
        "thinking_tokens": 7,
        "answer_tokens": 4,
        "markers": {"wait": 1, "hmm": 1, "let me check": 1},
        "repetition_loop": False,
    }


def test_anatomy_figures_and_summarize_by_hand():
    def record(pid, level, tokens, thinking, markers, loop):
        return {
            "id": pid,
            "difficulty": level,
            "correct": True,
            "tokens": tokens,
            "finish_reason": "stop",
            "thinking_tokens": thinking,
            "answer_tokens": tokens - thinking,
            "markers": markers,
            "repetition_loop": loop,
        }

    rows = [
        record("a", "1", 100, 80, {"wait": 2, "hmm": 1}, False),
        record("b", "2", 300, 0, {"wait": 1, "hmm": 0}, True),
    ]
    figures = anatomy_figures(rows)
    assert figures["mean_thinking_tokens"] == pytest.approx(40)
    assert figures["mean_answer_tokens"] == pytest.approx(160)
    assert figures["loop_rate"] == pytest.approx(0.5)
    assert figures["marker_rates_per_1k_tokens"] == pytest.approx({"wait": 7.5, "hmm": 2.5})  # 3 and 1 in 400 tokens
    assert figures["markers_per_1k_tokens"] == pytest.approx(10)
    summary = summarize(rows)
    assert summary["mean_thinking_tokens"] == pytest.approx(40)
    one = summary["by_difficulty"]["1"]
    assert one["marker_rates_per_1k_tokens"] == pytest.approx({"wait": 20, "hmm": 10}) and one["loop_rate"] == 0
    assert anatomy_figures([{"tokens": 5}]) == {}  # records without the fields add nothing


def test_pathological_response_in_bounded_time():
    rng = random.Random(0)
    vocabulary = [f"term{i}" for i in range(50)]
    pieces = [rng.choice(vocabulary) for _ in range(12_000)]
    for position in rng.sample(range(len(pieces)), 12):  # a dozen markers planted at random places
        pieces[position] = "but wait" if position % 2 else "hmm"
    planted = sum(p == "but wait" for p in pieces), sum(p == "hmm" for p in pieces)
    text = (" ".join(pieces) + " ")[:100_000]
    text += "x" * (100_000 - len(text))  # one long word at the end
    assert len(text) == 100_000
    ids = list(range(10, 25_010))  # no </think>, the prompt left thinking open
    start = time.perf_counter()
    figures = response_anatomy(ids, text, close_ids=(CLOSE,), open_ids=(OPEN,), prompt_open=True)
    unbroken = has_repetition_loop("ab" * 50_000) or count_markers("w" * 100_000, DEFAULT_MARKERS)["wait"]
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, elapsed
    assert (figures["thinking_tokens"], figures["answer_tokens"]) == (25_000, 0)
    assert (figures["markers"]["but wait"], figures["markers"]["hmm"]) == planted
    assert figures["markers"]["wait"] == 0
    assert not figures["repetition_loop"]  # random 20-word spans do not recur
    assert not unbroken
    assert has_repetition_loop("ab " * 33_000)  # a 99k-character loop is found


def test_add_anatomy_finds_the_tags_as_token_ids(tiny_tokenizer):
    """The demo tokenizer's tags are single tokens; each prompt convention splits as it should."""
    encode = lambda text: tiny_tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    problem = synthetic.test_problems()[0]
    thinking_free = PromptBuilder(tiny_tokenizer, template="plain", enable_thinking=False).student_ids(problem)
    assert tiny_tokenizer.decode(thinking_free).endswith("<think>\n\n</think>\n\n")
    r1_distill = PromptBuilder(tiny_tokenizer, template="plain").student_ids(problem) + encode("<think>\n")
    thought, close = encode("Hmm, wait: is 3 + 4 really 7? Yes, 7."), encode("</think>")
    answer = encode("\n\nAnswer: 9") + [tiny_tokenizer.eos_token_id]
    assert len(close) == 1

    def rollout(prompt, response, reason="stop"):
        text = tiny_tokenizer.decode(response, skip_special_tokens=True)
        return Rollout(0, tuple(prompt), tuple(response), text, reason)

    rollouts = [
        rollout(r1_distill, thought + close + answer),
        rollout(thinking_free, answer),
        rollout(r1_distill, thought, "length"),
        rollout(thinking_free, encode("<think>\n") + thought, "length"),
    ]
    graded = score_rollouts([problem], rollouts, "exact")
    add_anatomy(graded, tiny_tokenizer, AnatomyConfig(markers=["wait", "hmm"]))
    records = [g.anatomy for g in graded]
    splits = [(r["thinking_tokens"], r["answer_tokens"]) for r in records]
    assert splits == [(len(thought) + 1, len(answer)), (0, len(answer)), (len(thought), 0), (len(thought) + 2, 0)]
    assert [r["markers"] for r in records] == [
        {"wait": 1, "hmm": 1},
        {"wait": 0, "hmm": 0},
        {"wait": 1, "hmm": 1},
        {"wait": 1, "hmm": 1},
    ]


def test_markers_config_rejects_an_empty_or_repeated_phrase():
    assert AnatomyConfig(markers=[" let  me   check "]).markers == ["let me check"]
    for markers, named in [(["wait", "Wait"], "Wait"), (["wait", " "], "at least one word")]:
        with pytest.raises(ConfigError, match=rf"anatomy\.markers.*{named}"):
            validate(
                {
                    "model": {"path": "m"},
                    "benchmarks": ["synthetic"],
                    "output_dir": "o",
                    "anatomy": {"markers": markers},
                },
                EvalRunConfig,
            )


def test_cli_eval_reports_the_anatomy_with_its_own_markers(tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    main(
        eval_argv(
            tiny_model_dir,
            out,
            "--benchmark synthetic --limit 6 --k 2 --max-new-tokens 10",
            "--markers",
            "wait, let me check ,",
        )
    )
    summary = json.loads((out / "summary.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert summary["anatomy"] == {"markers": ["wait", "let me check"], "loop_ngram": 20, "loop_repeats": 3}
    assert list(summary["marker_rates_per_1k_tokens"]) == ["wait", "let me check"]
    assert all(s["thinking_tokens"] + s["answer_tokens"] == s["tokens"] for s in samples)
    assert summary["mean_answer_tokens"] == pytest.approx(sum(s["answer_tokens"] for s in samples) / len(samples))
    assert "loop_rate" in summary["by_difficulty"]["1"]
