"""SFT on the synthetic mix: which prompt gets which trace, what the loss covers, and that it learns."""

from __future__ import annotations


from types import SimpleNamespace

import pytest
import torch

from crisp.config import SFTConfig, validate
from crisp.data import synthetic
from crisp.modeling import load_model
from crisp.prompts import REFERENCE_TEMPLATE, PromptBuilder, resolve_instruction
from crisp.sft import (build_model_and_tokenizer, collate, lookup_probe, probe_traces, response_loss,
                       synthetic_examples, train_sft)

from conftest import TINY
from test_resume import assert_bitwise_equal, weights
from test_selfdistill import read_metrics



def make_cfg(out, **overrides):
    raw = {"method": "sft", "output_dir": str(out), "max_steps": 2, "seed": 0, "threads": 1,
           "model": {"tiny": TINY}, "prompt": {"template": "plain"},
           "data": {"source": "synthetic", "size": 400, "levels": [3, 4]},
           "mix": {"instructed_fraction": 0.3, "reference_fraction": 0.3, "verbose_prefix_fraction": 0.5},
           "batch_tokens": 1024, "optim": {"lr": 3e-3, "schedule": "constant"}, "log_every": 1}
    for key, value in overrides.items():
        raw[key] = value
    return validate(raw, SFTConfig)


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    cfg = make_cfg(tmp_path_factory.mktemp("sft"))
    _, tokenizer = build_model_and_tokenizer(cfg)
    return cfg, tokenizer, synthetic_examples(cfg, PromptBuilder(tokenizer, template="plain"))


def kind_of(prompt: str) -> str:
    if REFERENCE_TEMPLATE.split("{solution}")[0].split("{question}")[1].strip() in prompt:
        return "reference"
    return "instructed" if resolve_instruction("v1") in prompt else "plain"


def test_mix_gives_each_prompt_kind_its_own_trace_style(mix):
    _, tokenizer, examples = mix
    kinds = [kind_of(tokenizer.decode(e.prompt_ids)) for e in examples]
    shares = {k: kinds.count(k) / len(kinds) for k in ("plain", "instructed", "reference")}
    assert abs(shares["instructed"] - 0.3) < 0.07 and abs(shares["reference"] - 0.3) < 0.07, shares

    def trained_text(e) -> str:
        return tokenizer.decode([t for t, m in zip(e.response_ids, e.loss_mask) if m])

    lengths = {k: [len(trained_text(e).split()) for e, kind in zip(examples, kinds) if kind == k] for k in shares}
    mean = {k: sum(v) / len(v) for k, v in lengths.items()}
    assert mean["plain"] > 2 * mean["instructed"] and mean["plain"] > 2 * mean["reference"], mean
    # a reference-prompted writer never slips, so a trained line never says "not <wrong total>"
    assert not any(", not " in trained_text(e) for e, k in zip(examples, kinds) if k == "reference")
    assert any(", not " in trained_text(e) for e, k in zip(examples, kinds) if k == "instructed")
    # switching traces: the verbose prefix is in the response but not in the loss
    masked = [e for e in examples if 0 in e.loss_mask]
    assert masked and all(kind != "plain" for e, kind in zip(examples, kinds) if 0 in e.loss_mask)
    for e in masked:  # the prefix is one leading block (rarely the whole trace, when it never switched)
        first_trained = e.loss_mask.index(1) if 1 in e.loss_mask else len(e.loss_mask)
        assert 0 not in e.loss_mask[first_trained:]


def test_collate_labels_only_trained_response_tokens(mix):
    _, tokenizer, examples = mix
    examples = examples[:4]
    input_ids, attention, labels = collate(examples, tokenizer.pad_token_id)  # (B, T) each
    for row, e in enumerate(examples):
        expected = [t if m else -100 for t, m in zip(e.response_ids, e.loss_mask)]
        start = len(e.prompt_ids)
        assert labels[row, :start].eq(-100).all()
        assert labels[row, start : start + len(e.response_ids)].tolist() == expected
        assert attention[row].sum() == len(e.prompt_ids) + len(e.response_ids)


def test_short_run_lowers_the_loss_and_saves_a_loadable_model(mix, tmp_path):
    _, tokenizer, examples = mix
    cfg = make_cfg(tmp_path / "run", max_steps=40)
    batch = collate(examples[:16], tokenizer.pad_token_id)
    torch.manual_seed(cfg.seed)
    untrained, _ = build_model_and_tokenizer(cfg)
    final = train_sft(cfg)
    trained = load_model(str(final))
    with torch.no_grad():
        before, after = response_loss(untrained, *batch).item(), response_loss(trained, *batch).item()
    assert after < 0.8 * before, (before, after)
    steps = [m["step"] for m in read_metrics(tmp_path / "run")]
    assert steps == list(range(1, 41))
    assert (final / "crisp_config.yaml").is_file()


# ---------------------------------------------------------------------------------------------
# the lookup probe
# ---------------------------------------------------------------------------------------------


class NextTokenOracle(torch.nn.Module):
    """Predicts the token `shift` places ahead of each position: 1 is always right, 0 copies."""

    def __init__(self, vocab_size: int, shift: int):
        super().__init__()
        self.vocab_size, self.shift = vocab_size, shift
        self.unused = torch.nn.Parameter(torch.zeros(1))  # the probe reads the device from a parameter

    def forward(self, input_ids, attention_mask):
        ahead = torch.roll(input_ids, -self.shift, dims=1)
        return SimpleNamespace(logits=torch.nn.functional.one_hot(ahead, self.vocab_size).float())


def test_probe_marks_every_step_of_every_held_out_problem(mix):
    _, tokenizer, _ = mix
    traces = probe_traces(PromptBuilder(tokenizer, template="plain"))
    chains = synthetic.test_chains()
    assert len(traces) == len(chains)
    for trace, chain in zip(traces, chains):
        assert sorted((kind, step) for kind, step, _ in trace.targets) == sorted(
            (kind, step) for kind in ("operand", "result") for step in range(1, chain.level + 1))
        for kind, step, positions in trace.targets:
            text = tokenizer.decode([trace.ids[p + 1] for p in positions]).strip()
            expected = chain.operation(step - 1).split(" ", 1)[1] if kind == "operand" else str(chain.totals()[step])
            assert text == expected, (kind, step, text)


def test_probe_scores_an_oracle_one_and_a_copier_zero(mix):
    _, tokenizer, _ = mix
    traces = probe_traces(PromptBuilder(tokenizer, template="plain"))
    oracle = lookup_probe(NextTokenOracle(len(tokenizer), shift=1), traces, tokenizer.pad_token_id)
    copier = lookup_probe(NextTokenOracle(len(tokenizer), shift=0), traces, tokenizer.pad_token_id)
    names = {f"probe/{kind}_step{s}" for kind in ("operand", "result") for s in range(1, 5)}
    assert set(oracle) == set(copier) == names
    assert all(value == 1.0 for value in oracle.values()), oracle
    assert all(value == 0.0 for value in copier.values()), copier


def test_probing_during_sft_logs_probe_metrics_and_leaves_training_alone(tmp_path):
    plain = train_sft(make_cfg(tmp_path / "plain", max_steps=4, log_every=3))
    probed = train_sft(make_cfg(tmp_path / "probed", max_steps=4, log_every=3, probe_every=2))
    assert_bitwise_equal(weights(probed), weights(plain))
    rows = read_metrics(tmp_path / "probed")
    assert [r["step"] for r in rows] == [2, 3, 4]  # a probe-only record, a log step, both at the end
    assert {k for k in rows[0] if k != "step"} == {k for k in rows[2] if k.startswith("probe/")}
    assert all(0 <= rows[0][k] <= 1 for k in rows[0] if k != "step")
    assert not any(k.startswith("probe/") for k in rows[1])


def test_probe_every_needs_the_synthetic_task(tmp_path):
    with pytest.raises(ValueError, match="probe_every"):
        make_cfg(tmp_path, probe_every=10, data={"source": "gsm8k"})
