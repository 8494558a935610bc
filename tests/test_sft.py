"""SFT on the synthetic mix: which prompt gets which trace, what the loss covers, and that it learns."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import TINY, read_metrics
from test_resume import assert_bitwise_equal, weights

from crisp.config import validate
from crisp.data import synthetic
from crisp.data.tasks import get_task
from crisp.driver import train
from crisp.methods.sft import SFTConfig, collate, new_tiny_model, response_loss
from crisp.modeling import load_model
from crisp.prompts import CLOSED_THINKING, REFERENCE_TEMPLATE, PromptBuilder, resolve_instruction

MIX = {"plain": 0.2, "v1": 0.2, "v2": 0.2, "reference": 0.2, "thinking_free": 0.2, "verbose_prefix_fraction": 0.5}


def make_cfg(out, **overrides):
    raw = {
        "method": "sft",
        "output_dir": str(out),
        "max_steps": 2,
        "seed": 0,
        "threads": 1,
        "model": {"tiny": TINY},
        "prompt": {"template": "plain"},
        "data": {"source": "synthetic", "size": 500, "levels": [3, 4]},
        "mix": MIX,
        "batch_tokens": 1024,
        "optim": {"lr": 3e-3, "schedule": "constant"},
        "log_every": 1,
    }
    for key, value in overrides.items():
        raw[key] = value
    return validate(raw, SFTConfig)


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    cfg = make_cfg(tmp_path_factory.mktemp("sft"))
    _, tokenizer = new_tiny_model(cfg)
    return cfg, tokenizer, get_task("synthetic").sft_examples(cfg, PromptBuilder(tokenizer, template="plain"))


def kind_of(prompt: str) -> str:
    """Which prompt a rendered SFT prompt is, told apart by the text each kind adds."""
    if REFERENCE_TEMPLATE.split("{solution}")[0].split("{question}")[1].strip() in prompt:
        return "reference"
    for preset in ("v1", "v2"):
        if resolve_instruction(preset) in prompt:
            return preset
    return "thinking_free" if prompt.endswith(CLOSED_THINKING) else "plain"


def test_the_corpus_holds_every_prompt_a_method_uses_each_in_its_style(mix):
    cfg, tokenizer, examples = mix
    builder = PromptBuilder(tokenizer, template="plain")
    problem = synthetic.to_problem(synthetic.Chain(3, (2,)), 0, "t")
    # exactly the prompts the methods build: the student's, CRISP's teachers, OPSD's teacher
    assert tokenizer.decode(
        tokenizer(synthetic.sft_prompt(builder, problem, "plain"))["input_ids"]
    ) == tokenizer.decode(builder.student_ids(problem))
    assert synthetic.sft_prompt(builder, problem, "v2") == builder.render(
        builder.teacher_text(problem, instruction=resolve_instruction("v2"), reference=False)
    )
    assert synthetic.sft_prompt(builder, problem, "reference") == builder.render(
        builder.teacher_text(problem, instruction=None, reference=True)
    )
    assert synthetic.sft_prompt(builder, problem, "thinking_free") == tokenizer.apply_chat_template(
        [{"role": "user", "content": problem.question}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )

    kinds = [kind_of(tokenizer.decode(e.prompt_ids)) for e in examples]
    for kind in MIX:
        if kind != "verbose_prefix_fraction":
            assert abs(kinds.count(kind) / len(kinds) - 0.2) < 0.06, (kind, kinds.count(kind))

    def trained_text(e) -> str:
        return tokenizer.decode([t for t, m in zip(e.response_ids, e.loss_mask) if m])

    def style(kind, test):
        return [test(trained_text(e)) for e, k in zip(examples, kinds) if k == kind]

    words = {k: sum(style(k, lambda t: len(t.split()))) / kinds.count(k) for k in ("plain", "v1", "reference")}
    assert words["plain"] > 2 * words["v1"] and words["plain"] > 2 * words["reference"], words
    assert all(style("thinking_free", lambda t: "<think>" not in t and "</think>" not in t))
    assert all(style("plain", lambda t: t.startswith("<think>\n") and "\n</think>\n\nAnswer: " in t))
    assert not any(style("reference", lambda t: " is not " in t or "Hmm" in t))  # a reader of the totals never slips
    assert any(style("plain", lambda t: "Hmm, wait" in t)) and any(style("v1", lambda t: " is not " in t))
    # switching traces: the verbose prefix is in the response but not in the loss, and only there
    masked = [(e, k) for e, k in zip(examples, kinds) if 0 in e.loss_mask]
    assert masked and {k for _, k in masked} <= set(synthetic.SWITCHING_KINDS)
    for e, _ in masked:
        first_trained = e.loss_mask.index(1)
        assert 0 not in e.loss_mask[first_trained:]
        assert tokenizer.decode(e.response_ids[:first_trained]).startswith("<think>\n")
    assert all(e.loss_mask[-1] == 1 and e.response_ids[-1] == tokenizer.eos_token_id for e in examples)


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
    untrained, _ = new_tiny_model(cfg)
    final = train(cfg)
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
    traces = synthetic.probe_traces(PromptBuilder(tokenizer, template="plain"))
    chains = synthetic.test_chains()
    assert len(traces) == len(chains)
    for trace, chain in zip(traces, chains):
        assert sorted((kind, step) for kind, step, _ in trace.targets) == sorted(
            (kind, step) for kind in ("operand", "result") for step in range(1, chain.level + 1)
        )
        for kind, step, positions in trace.targets:
            text = tokenizer.decode([trace.ids[p + 1] for p in positions]).strip()
            expected = chain.operation(step - 1).split(" ", 1)[1] if kind == "operand" else str(chain.totals()[step])
            assert text == expected, (kind, step, text)


def test_probe_scores_an_oracle_one_and_a_copier_zero(mix):
    _, tokenizer, _ = mix
    traces = synthetic.probe_traces(PromptBuilder(tokenizer, template="plain"))
    oracle = synthetic.lookup_probe(NextTokenOracle(len(tokenizer), shift=1), traces, tokenizer.pad_token_id)
    copier = synthetic.lookup_probe(NextTokenOracle(len(tokenizer), shift=0), traces, tokenizer.pad_token_id)
    names = {f"probe/{kind}_step{s}" for kind in ("operand", "result") for s in range(1, 5)}
    assert set(oracle) == set(copier) == names
    assert all(value == 1.0 for value in oracle.values()), oracle
    assert all(value == 0.0 for value in copier.values()), copier


def test_probing_during_sft_logs_probe_metrics_and_leaves_training_alone(tmp_path):
    plain = train(make_cfg(tmp_path / "plain", max_steps=4, log_every=3))
    probed = train(make_cfg(tmp_path / "probed", max_steps=4, log_every=3, probe_every=2))
    assert_bitwise_equal(weights(probed), weights(plain))
    rows = read_metrics(tmp_path / "probed")
    assert [r["step"] for r in rows] == [2, 3, 4]  # a probed step is logged, a log step, both at the end
    probes = {k for k in rows[2] if k.startswith("probe/")}
    assert probes and probes <= set(rows[0]) and all(0 <= rows[0][k] <= 1 for k in probes)
    assert not any(k.startswith("probe/") for k in rows[1])
    assert [r["step"] for r in read_metrics(tmp_path / "plain")] == [3, 4]


def test_probe_every_needs_the_synthetic_task(tmp_path):
    with pytest.raises(ValueError, match="probe_every"):
        make_cfg(tmp_path, probe_every=10, data={"source": "gsm8k"})
