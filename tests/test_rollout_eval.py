"""Generation (HFGenerator and the plain KVCacheGenerator on a tiny random model), the evaluation summary and baseline ratios
computed by hand, and `crisp eval` end to end."""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import TINY, eval_argv, level_prompts, sharpen

from crisp import cli
from crisp.config import SamplingConfig
from crisp.data import synthetic
from crisp.data.synthetic import SyntheticTask
from crisp.evaluate import compare_to_baseline, summarize
from crisp.modeling import build_tiny_model
from crisp.rollout import HFGenerator, KVCacheGenerator, SeededSampler, request_keys

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def sharp_model(tiny_tokenizer):
    """A tiny random model whose samples sometimes stop and sometimes run to the cap."""
    return sharpen(build_tiny_model(tiny_tokenizer, seed=0, **TINY), tiny_tokenizer)


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    # longest first: the generator's length sort must reorder them
    return sorted(level_prompts(tiny_tokenizer), key=len, reverse=True)


SAMPLING = SamplingConfig(n=3, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=20)


# ---------------------------------------------------------------------------------------------
# generation backends
# ---------------------------------------------------------------------------------------------


BACKENDS = pytest.mark.parametrize("backend", [HFGenerator, KVCacheGenerator])


@BACKENDS
def test_same_seed_same_rollouts(sharp_model, tiny_tokenizer, prompts, backend):
    generator = backend(sharp_model, tiny_tokenizer)
    a = generator.generate(prompts, SAMPLING, seed=5)
    b = generator.generate(prompts, SAMPLING, seed=5)
    c = generator.generate(prompts, SAMPLING, seed=6)
    assert a == b
    assert [r.token_ids for r in a] != [r.token_ids for r in c]


@BACKENDS
def test_n_samples_per_prompt_in_prompt_order(sharp_model, tiny_tokenizer, prompts, backend):
    rollouts = backend(sharp_model, tiny_tokenizer, batch_size=5).generate(prompts, SAMPLING, seed=0)
    assert len(rollouts) == len(prompts) * SAMPLING.n
    assert [r.prompt_index for r in rollouts] == [i for i in range(len(prompts)) for _ in range(SAMPLING.n)]
    for r in rollouts:
        assert list(r.prompt_ids) == prompts[r.prompt_index]
    # the n samples of one prompt are different draws
    first = [r.token_ids for r in rollouts[: SAMPLING.n]]
    assert len(set(first)) > 1


@BACKENDS
def test_finish_reason_eos_and_length(sharp_model, tiny_tokenizer, prompts, backend):
    eos = tiny_tokenizer.eos_token_id
    rollouts = backend(sharp_model, tiny_tokenizer).generate(prompts, SAMPLING, seed=0)
    reasons = Counter(r.finish_reason for r in rollouts)
    assert reasons["stop"] > 0 and reasons["length"] > 0  # both branches below are exercised
    for r in rollouts:
        assert 1 <= r.num_tokens <= SAMPLING.max_new_tokens
        assert (r.token_ids[-1] == eos) == (r.finish_reason == "stop")
        assert eos not in r.token_ids[:-1]  # nothing after the EOS
        if r.finish_reason == "length":
            assert r.num_tokens == SAMPLING.max_new_tokens
        assert r.text == tiny_tokenizer.decode(list(r.token_ids), skip_special_tokens=True)


@BACKENDS
def test_max_new_tokens_argument_overrides_the_config(sharp_model, tiny_tokenizer, prompts, backend):
    rollouts = backend(sharp_model, tiny_tokenizer).generate(prompts, SAMPLING, seed=0, max_new_tokens=4)
    assert max(r.num_tokens for r in rollouts) == 4
    assert all(r.num_tokens == 4 for r in rollouts if r.finish_reason == "length")


@BACKENDS
def test_left_padding_does_not_change_greedy_tokens(sharp_model, tiny_tokenizer, prompts, backend):
    greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=20)
    generator = backend(sharp_model, tiny_tokenizer)
    short, long = min(prompts, key=len), max(prompts, key=len)
    assert len(long) > len(short)
    alone = generator.generate([short], greedy)[0]
    batched = generator.generate([long, short], greedy)
    assert batched[1].prompt_ids == alone.prompt_ids
    assert batched[1].token_ids == alone.token_ids
    assert len(set(alone.token_ids)) > 2  # not a degenerate repetition that any bug would reproduce
    one_by_one = [generator.generate([p], greedy)[0].token_ids for p in prompts]
    together = [r.token_ids for r in generator.generate(prompts, greedy)]
    assert together == one_by_one


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 4, 1.0), (1.3, 0, 0.8)])
def test_seeded_sampler_draws_from_the_filtered_distribution(temperature, top_k, top_p):
    """20,000 requests, one distribution: the sampled frequencies match softmax(logits / T) restricted
    to the top-k / top-p set (a token outside it is never drawn)."""
    rows, vocab = 20_000, 10
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0])
    keys = request_keys(7, range(rows), [0] * rows)
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    scores = SeededSampler(keys, prompt_width=3, sampling=sampling)(
        torch.zeros(rows, 5, dtype=torch.long), logits.expand(rows, vocab).clone()
    )
    assert (scores.max(dim=1).values == 0).all() and torch.isinf(scores).sum() == rows * (vocab - 1)
    frequencies = torch.bincount(scores.argmax(dim=1), minlength=vocab) / rows
    probs = torch.softmax(logits / temperature, dim=0)
    allowed = torch.ones(vocab, dtype=torch.bool)
    if top_k:
        allowed[top_k:] = False
    if top_p < 1:  # the smallest prefix of the sorted tokens whose mass reaches top_p
        allowed = torch.cumsum(probs, 0) - probs < top_p
    assert 1 < allowed.sum() < vocab or not (top_k or top_p < 1)
    expected = torch.where(allowed, probs, 0.0) / probs[allowed].sum()
    assert (frequencies[~allowed] == 0).all()
    assert (frequencies - expected).abs().max() < 0.015  # ~4 standard errors at 20,000 draws


def test_noise_depends_on_seed_position_and_request():
    keys = request_keys(3, [0, 0, 1], [0, 1, 0])
    assert len(set(keys.tolist())) == 3
    assert torch.equal(keys, request_keys(3, [0, 0, 1], [0, 1, 0]))
    assert not torch.equal(keys, request_keys(4, [0, 0, 1], [0, 1, 0]))
    assert not torch.equal(keys, request_keys(3 + 2**32, [0, 0, 1], [0, 1, 0]))  # the seed's high bits count


@BACKENDS
def test_a_prompt_gets_the_same_rollouts_in_any_batch(sharp_model, tiny_tokenizer, prompts, backend):
    """What data parallelism relies on: a prompt's samples depend on its index in the global batch,
    not on which other prompts share its call or generation chunk."""
    everything = backend(sharp_model, tiny_tokenizer).generate(prompts, SAMPLING, seed=11)
    n = SAMPLING.n
    for first, stop, batch_size in [(0, 4, 256), (4, len(prompts), 256), (2, 7, 2)]:
        part = backend(sharp_model, tiny_tokenizer, batch_size=batch_size).generate(
            prompts[first:stop], SAMPLING, seed=11, first_index=first
        )
        assert part == everything[first * n : stop * n]
    shifted = backend(sharp_model, tiny_tokenizer).generate(prompts[2:7], SAMPLING, seed=11)
    assert [r.token_ids for r in shifted] != [r.token_ids for r in everything[2 * n : 7 * n]]


@BACKENDS
def test_generate_restores_training_mode(tiny_model, tiny_tokenizer, prompts, backend):
    tiny_model.train()
    backend(tiny_model, tiny_tokenizer).generate(prompts[:1], SamplingConfig(n=1, max_new_tokens=2), seed=0)
    assert tiny_model.training
    tiny_model.eval()
    backend(tiny_model, tiny_tokenizer).generate(prompts[:1], SamplingConfig(n=1, max_new_tokens=2), seed=0)
    assert not tiny_model.training


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingConfig(n=2, temperature=0.0, max_new_tokens=20),
        SamplingConfig(n=2, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=20),
        SamplingConfig(n=2, temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=20),
        SamplingConfig(n=2, temperature=1.3, top_p=0.8, top_k=6, max_new_tokens=20),
    ],
    ids=["greedy", "plain", "top_p", "top_k_top_p"],
)
def test_plain_loop_returns_hf_generate_tokens(sharp_model, tiny_tokenizer, prompts, sampling):
    """Same model, prompts (left-padded batches) and seed: the plain loop draws exactly the tokens
    that HF generate draws, greedy or sampled."""
    hf = HFGenerator(sharp_model, tiny_tokenizer, batch_size=4).generate(prompts, sampling, seed=3)
    plain = KVCacheGenerator(sharp_model, tiny_tokenizer, batch_size=4).generate(prompts, sampling, seed=3)
    assert plain == hf
    assert len({r.token_ids for r in hf}) > len(prompts) // 2  # varied outputs, not one repeated string
    assert {r.finish_reason for r in hf} == {"stop", "length"} or sampling.temperature == 0


# ---------------------------------------------------------------------------------------------
# summarize / compare_to_baseline, by hand
# ---------------------------------------------------------------------------------------------


def _record(pid, difficulty, correct, tokens, reason="stop"):
    return {"id": pid, "difficulty": difficulty, "correct": correct, "tokens": tokens, "finish_reason": reason}


RECORDS = [  # k = 2 samples for each of three problems, in sample order a0 a1 b0 b1 c0 c1
    _record("a", "1", True, 10),
    _record("a", "1", False, 20, "length"),
    _record("b", "1", False, 30),
    _record("b", "1", False, 40, "length"),
    _record("c", "2", True, 5),
    _record("c", "2", True, 15),
]


def test_summarize_by_hand():
    s = summarize(RECORDS)
    assert s["accuracy"] == pytest.approx(3 / 6)
    assert s["pass_at_k"] == pytest.approx(2 / 3)  # a and c have a correct sample
    assert s["mean_tokens"] == pytest.approx((10 + 20 + 30 + 40 + 5 + 15) / 6)
    assert s["mean_tokens_correct"] == pytest.approx((10 + 5 + 15) / 3)
    assert s["truncation_rate"] == pytest.approx(2 / 6)
    assert s["num_problems"] == 3 and s["num_samples"] == 6
    # sample set 0 = (a0, b0, c0): 2/3 correct; sample set 1 = (a1, b1, c1): 1/3
    assert s["accuracy_std_over_samples"] == pytest.approx(statistics.pstdev([2 / 3, 1 / 3]))
    assert list(s["by_difficulty"]) == ["1", "2"]
    one, two = s["by_difficulty"]["1"], s["by_difficulty"]["2"]
    assert one["accuracy"] == pytest.approx(1 / 4)
    assert one["pass_at_k"] == pytest.approx(1 / 2)
    assert one["mean_tokens"] == pytest.approx(25)
    assert one["mean_tokens_correct"] == pytest.approx(10)
    assert one["truncation_rate"] == pytest.approx(1 / 2)
    assert two["accuracy"] == 1 and two["pass_at_k"] == 1
    assert two["mean_tokens"] == pytest.approx(10) and two["mean_tokens_correct"] == pytest.approx(10)
    assert two["truncation_rate"] == 0


def test_summarize_adds_the_task_figures_overall_and_per_level():
    audited = [
        dict(_record("a", "1", True, 10), steps=2, operands_right=2, results_right=1),
        dict(_record("b", "2", False, 20), steps=3, operands_right=1, results_right=3),
    ]
    s = summarize(audited, SyntheticTask())
    assert s["operand_accuracy"] == pytest.approx(3 / 5) and s["result_accuracy"] == pytest.approx(4 / 5)
    assert s["by_difficulty"]["2"]["operand_accuracy"] == pytest.approx(1 / 3)
    assert "operand_accuracy" not in summarize(audited)  # no task, no task figures


def test_summarize_no_correct_and_level_order():
    records = [_record("x", "10", False, 4), _record("y", "2", False, 6), _record("z", None, False, 8)]
    s = summarize(records)
    assert s["accuracy"] == 0 and s["pass_at_k"] == 0
    assert s["mean_tokens_correct"] is None
    assert list(s["by_difficulty"]) == ["2", "10"]  # numeric order; no level for None
    assert s["accuracy_std_over_samples"] == 0.0


def test_compare_to_baseline_by_hand():
    base = {
        "accuracy": 0.5,
        "mean_tokens": 100.0,
        "by_difficulty": {"1": {"accuracy": 0.8, "mean_tokens": 50.0}, "3": {"accuracy": 0.2, "mean_tokens": 10}},
    }
    run = {
        "accuracy": 0.6,
        "mean_tokens": 40.0,
        "by_difficulty": {"1": {"accuracy": 0.4, "mean_tokens": 25.0}, "2": {"accuracy": 1.0, "mean_tokens": 1}},
    }
    out = compare_to_baseline(run, base)
    overall = out["overall"]
    assert overall["compression_ratio"] == pytest.approx(0.4)
    assert overall["token_reduction"] == pytest.approx(0.6)
    assert overall["accuracy_delta"] == pytest.approx(0.1)
    assert overall["dacc"] == pytest.approx(0.6 / 0.5 - 1)
    assert overall["dacc_over_cr"] == pytest.approx((0.6 / 0.5 - 1) / 0.4)
    assert set(out["by_difficulty"]) == {"1"}  # only levels both runs have
    level = out["by_difficulty"]["1"]
    assert level["compression_ratio"] == pytest.approx(0.5)
    assert level["accuracy_delta"] == pytest.approx(-0.4)
    assert level["dacc"] == 0.0  # max(0.4 / 0.8 - 1, 0)
    assert level["dacc_over_cr"] == 0.0


def test_compare_to_baseline_zero_baseline():
    out = compare_to_baseline({"accuracy": 0.3, "mean_tokens": 5.0}, {"accuracy": 0.0, "mean_tokens": 0.0})
    assert out["overall"]["compression_ratio"] is None and out["overall"]["dacc"] is None
    assert out["overall"]["dacc_over_cr"] is None
    assert out["overall"]["accuracy_delta"] == pytest.approx(0.3)


# ---------------------------------------------------------------------------------------------
# crisp eval, end to end
# ---------------------------------------------------------------------------------------------


def _read(out: Path):
    summary = json.loads((out / "summary.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return summary, samples


def test_cli_eval_synthetic(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    limit = synthetic.TEST_PER_LEVEL + 10  # levels 1 and 2
    cli.main(
        eval_argv(
            tiny_model_dir,
            out,
            f"--benchmark synthetic --limit {limit} --k 2 --max-new-tokens 12 "
            "--temperature 0.7 --top-p 0.9 --top-k 5 --seed 3",
        )
    )
    summary, samples = _read(out)
    assert 0 <= summary["accuracy"] <= 1
    assert summary["k"] == 2
    assert summary["grader"].startswith("exact")
    assert summary["prompt_template"] == "plain"
    sampling = summary["sampling"]
    assert (sampling["temperature"], sampling["top_p"], sampling["top_k"], sampling["max_new_tokens"]) == (
        0.7,
        0.9,
        5,
        12,
    )
    assert sampling["n"] == 2
    assert set(summary["by_difficulty"]) == {"1", "2"}
    for level, figures in summary["by_difficulty"].items():
        rows = [s for s in samples if s["difficulty"] == level]
        assert figures["accuracy"] == pytest.approx(statistics.fmean(s["correct"] for s in rows))
        assert figures["mean_tokens"] == pytest.approx(statistics.fmean(s["tokens"] for s in rows))
    # k rows per problem, the problems being the first `limit` of the held-out split
    counts = Counter(s["id"] for s in samples)
    assert len(samples) == 2 * limit and set(counts.values()) == {2}
    assert list(dict.fromkeys(s["id"] for s in samples)) == [p.id for p in synthetic.test_problems()[:limit]]
    assert summary["accuracy"] == pytest.approx(statistics.fmean(s["correct"] for s in samples))
    assert summary["mean_tokens"] == pytest.approx(statistics.fmean(s["tokens"] for s in samples))
    assert all(1 <= s["tokens"] <= 12 for s in samples)
    assert summary["num_problems"] == limit
    assert all({"steps", "operands_right", "results_right"} <= s.keys() for s in samples)  # synthetic: audited
    steps = sum(s["steps"] for s in samples)
    if steps:  # an untrained model may write no step line at all
        assert summary["operand_accuracy"] == pytest.approx(sum(s["operands_right"] for s in samples) / steps)
    else:
        assert "operand_accuracy" not in summary
    assert "summary.json" in capsys.readouterr().out


def test_cli_eval_with_baseline(tiny_model_dir, tmp_path):
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"accuracy": 0.5, "mean_tokens": 100.0, "by_difficulty": {}}))
    out = tmp_path / "eval"
    cli.main(
        eval_argv(tiny_model_dir, out, "--benchmark synthetic --limit 4 --max-new-tokens 6", "--baseline", str(base))
    )
    summary, _ = _read(out)
    assert summary["vs_baseline"]["overall"]["compression_ratio"] == pytest.approx(summary["mean_tokens"] / 100)


def test_cli_eval_gsm8k_fixture_with_dapo(tiny_model_dir, tmp_path):
    out = tmp_path / "gsm8k"
    fixture = FIXTURES / "gsm8k_sample.jsonl"
    lines = [line for line in fixture.read_text().splitlines() if line.strip()]
    cli.main(eval_argv(tiny_model_dir, out, "--template dapo --max-new-tokens 8", "--benchmark", str(fixture)))
    summary, samples = _read(out)
    assert isinstance(summary["accuracy"], float) and 0 <= summary["accuracy"] <= 1
    assert math.isfinite(summary["mean_tokens"])
    assert summary["prompt_template"] == "dapo"
    assert summary["grader"].startswith("math-verify")
    assert len(samples) == len(lines)
    assert samples[-1]["gold"] == json.loads(lines[-1])["answer"].rpartition("####")[2].strip()


def test_cli_eval_bad_k_exits_2(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(eval_argv(tiny_model_dir, tmp_path / "x", "--benchmark synthetic --k 0"))
    assert info.value.code == 2
    assert "--k" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--benchmark", "synthetic"], "--model, --out"),  # without --config the flags are required
        (["--config", "eval.yaml", "--model", "m"], "--config"),  # with it, they are overrides
        (["--model", "m", "--benchmark", "synthetic", "--out", "o", "k=2"], "k=2"),  # overrides need --config
    ],
)
def test_cli_eval_flag_errors_exit_2_naming_the_flag(argv, named, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["eval", *argv])
    assert info.value.code == 2
    assert named in capsys.readouterr().err
