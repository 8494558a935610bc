"""Shared fixtures: a tiny word-level tokenizer and a tiny random HF model, built once per session."""

from __future__ import annotations

import pytest
import torch

# The test models are tiny: one thread is faster than two, and on busy cores a multi-threaded
# torch spends most of its time waiting for its own threads (a 32x32 matmul took 20 ms).
torch.set_num_threads(1)

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


def vocabulary() -> list[str]:
    """The synthetic task's word pieces plus every prompt preset (raw and resolved)."""
    from crisp.data import synthetic
    from crisp.prompts import INSTRUCTIONS, prompt_texts, resolve_instruction

    texts = synthetic.vocabulary_texts(traces=300) + prompt_texts()
    texts += [resolve_instruction(name) for name in INSTRUCTIONS]
    return texts


def sharpen(model, tokenizer, seed: int = 1):
    """Larger weights (peaked, varied next-token distributions instead of near-uniform ones) and a
    boosted EOS row, so that some samples stop and others run to the cap; returned in eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
        model.get_input_embeddings().weight[tokenizer.eos_token_id] *= 2
    return model.eval()


def level_prompts(tokenizer) -> list[list[int]]:
    """Student prompts (plain template) of every 25th held-out synthetic problem: every level, and
    prompts of different lengths."""
    from crisp.data import synthetic
    from crisp.prompts import PromptBuilder

    builder = PromptBuilder(tokenizer, template="plain")
    ids = [builder.student_ids(p) for p in synthetic.test_problems()[::25]]
    assert len({len(p) for p in ids}) > 1
    return ids


def tiny_run(method: str, model_dir, out, settings: dict, overrides: dict):
    """A validated config of `method` for a short run of the tiny model: 2 steps on 64 synthetic
    problems with plain prompts, logged every step; then `settings`, then `overrides` (dotted keys)."""
    from crisp.config import set_path, validate

    data = {
        "method": method,
        "output_dir": str(out),
        "max_steps": 2,
        "seed": 0,
        "model": {"path": str(model_dir)},
        "prompt": {"template": "plain"},
        "data": {"source": "synthetic", "size": 64},
        "optim": {"lr": 1e-2, "grad_clip": 1.0},
        "log_every": 1,
        **settings,
    }
    for key, value in overrides.items():
        set_path(data, key.split("."), value)
    return validate(data)


def read_metrics(out) -> list[dict]:
    """A run directory's metrics.jsonl, one dict per record."""
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]


def snapshot(model) -> dict:
    """A copy of every tensor of the model's state."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def eval_argv(model_dir, out, flags: str, *extra: str) -> list[str]:
    """`crisp eval` of the model in `model_dir` into `out`, with the space-separated `flags` and then
    `extra` (arguments that may hold spaces: paths, phrases)."""
    return ["eval", "--model", str(model_dir), "--out", str(out), *flags.split(), *extra]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from crisp.modeling import build_word_tokenizer

    return build_word_tokenizer(vocabulary())


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_tokenizer, tmp_path_factory):
    """A saved tiny Llama (random weights) with its tokenizer: an ordinary HF model directory."""
    from crisp.modeling import build_tiny_model, save_model

    directory = tmp_path_factory.mktemp("tiny_model")
    model = build_tiny_model(tiny_tokenizer, seed=0, **TINY)
    save_model(model, tiny_tokenizer, directory)
    return directory


@pytest.fixture()
def tiny_model(tiny_model_dir):
    """A fresh copy of the saved tiny model (tests may change its weights)."""
    from crisp.modeling import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture()
def loaded_tokenizer(tiny_model_dir):
    """The tokenizer as a training run sees it (AutoTokenizer from the saved directory)."""
    from crisp.modeling import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


# ---------------------------------------------------------------------------------------------
# What training tests inject into a run instead of patching crisp: rewards a random model can earn,
# and a generator that records what it was asked for.
# ---------------------------------------------------------------------------------------------


def alternating_reward(graded, cap) -> list[float]:
    """A random tiny model never answers right (all rewards 0, no signal): reward every other
    rollout instead, so that each group has mixed rewards and non-zero advantages."""
    return [float(i % 2) for i in range(len(graded))]


def parity_reward(graded, cap) -> list[float]:
    """A reward that a random model can earn, fixed by the rollout itself (the same on every rank)."""
    return [float(sum(g.rollout.token_ids) % 2) for g in graded]


class RecordingGenerator:
    """Wraps a run's generator: every call's prompts, max_new_tokens and rollouts are recorded."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def generate(self, prompts, sampling, *, max_new_tokens=None, **kwargs):
        rollouts = self.inner.generate(prompts, sampling, max_new_tokens=max_new_tokens, **kwargs)
        self.calls.append({"prompts": list(prompts), "max_new_tokens": max_new_tokens, "rollouts": rollouts})
        return rollouts


def recorded_run(cfg, **options):
    """A crisp.driver.Training of `cfg` whose generator records its calls: (training, recorder)."""
    from crisp.driver import Training

    training = Training(cfg, **options)
    recorder = RecordingGenerator(training.method.generator)
    training.method.generator = recorder
    return training, recorder
