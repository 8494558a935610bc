"""The vLLM backend (crisp.rollout_vllm) against the HF backend, on the real engine (vLLM's CPU
build) and tiny models built here: greedy decoding agrees with HF generate; after a training step
and a sync the engine runs the updated weights (and without the sync it is caught stale); tied
embeddings and LoRA reach it; seeds give the same rollouts in any batch, slice or rebuilt engine;
sampling follows the model's distribution (a chi-square test); bad settings fail before compute.

Without vLLM installed these tests skip; with CRISP_REQUIRE_VLLM=1 (CI) they fail instead.
"""

from __future__ import annotations

import copy
import math
import os
import random
from collections import Counter

import numpy as np
import pytest
import torch

from crisp.config import ConfigError, SamplingConfig, VLLMSettings

try:
    from crisp.rollout_vllm import import_vllm

    import_vllm()
except ConfigError:
    if os.environ.get("CRISP_REQUIRE_VLLM") == "1":
        raise
    pytest.skip("vLLM is not installed (make setup-vllm)", allow_module_level=True)

from conftest import level_prompts, sharpen

from crisp.methods.grpo import token_logprobs
from crisp.modeling import build_tiny_model, prepare_for_training
from crisp.rollout import HFGenerator
from crisp.rollout_vllm import VLLMGenerator, engine_weights

# vLLM's CPU attention needs a head size of at least 32 (conftest's TINY has 16)
ENGINE_TINY = dict(hidden_size=64, num_layers=1, num_heads=2, intermediate_size=64)
SETTINGS = VLLMSettings(max_model_len=256, kv_cache_gib=0.25)


@pytest.fixture(scope="module")
def engine_model(tiny_tokenizer):
    return sharpen(build_tiny_model(tiny_tokenizer, architecture="qwen3", seed=0, **ENGINE_TINY), tiny_tokenizer)


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    return level_prompts(tiny_tokenizer)


@pytest.fixture(scope="module")
def engine(engine_model, tiny_tokenizer):
    return VLLMGenerator(engine_model, tiny_tokenizer, SETTINGS)


GREEDY = SamplingConfig(n=1, temperature=0.0, max_new_tokens=24)
SAMPLING = SamplingConfig(n=3, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=16)


def hf_logprobs(model, rollouts) -> list[list[float]]:
    with torch.no_grad():
        values, mask = token_logprobs(
            model, [r.prompt_ids for r in rollouts], [r.token_ids for r in rollouts], pad_id=0, chunk_size=64
        )  # (B, T), (B, T)
    return [row[m].tolist() for row, m in zip(values, mask)]


def assert_logprobs_close(engine_values, hf_values, atol=1e-4):
    flat_engine = torch.tensor([v for row in engine_values for v in row])
    flat_hf = torch.tensor([v for row in hf_values for v in row])
    assert len(flat_engine) == len(flat_hf) > 0
    torch.testing.assert_close(flat_engine, flat_hf, atol=atol, rtol=0)


def test_greedy_matches_hf_generate(engine, engine_model, tiny_tokenizer, prompts):
    ours = engine.generate(prompts, GREEDY)
    theirs = HFGenerator(engine_model, tiny_tokenizer).generate(prompts, GREEDY)
    assert ours == theirs  # token ids (EOS kept), finish reasons, decoded text, prompt indices
    reasons = Counter(r.finish_reason for r in ours)
    assert reasons["stop"] > 0 and reasons["length"] > 0
    assert all(r.token_ids[-1] == tiny_tokenizer.eos_token_id for r in ours if r.finish_reason == "stop")
    assert len({r.token_ids for r in ours}) > 2  # not one degenerate answer that any bug reproduces


def test_a_training_step_reaches_the_engine_only_through_a_sync(engine_model, tiny_tokenizer, prompts):
    model = copy.deepcopy(engine_model).train()
    generator = VLLMGenerator(model, tiny_tokenizer, SETTINGS)
    before = generator.generate(prompts, GREEDY)

    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-2)
    ids = torch.tensor([prompts[0] + list(before[0].token_ids)])  # (1, T)
    (-model(input_ids=ids, labels=ids).loss).backward()  # away from what it says now
    optimizer.step()
    model.eval()
    hf = HFGenerator(model, tiny_tokenizer)

    stale = generator.generate(prompts, GREEDY)
    stale_sampled, stale_logprobs = generator.generate_with_logprobs(prompts, SAMPLING, seed=3)
    assert stale == before  # no sync: the engine still runs the old weights ...
    assert stale != hf.generate(prompts, GREEDY)  # ... which the updated model no longer matches
    with pytest.raises(AssertionError):
        assert_logprobs_close(stale_logprobs, hf_logprobs(model, stale_sampled))

    generator.load_weights(model)
    assert generator.generate(prompts, GREEDY) == hf.generate(prompts, GREEDY)
    sampled, logprobs = generator.generate_with_logprobs(prompts, SAMPLING, seed=3)
    assert_logprobs_close(logprobs, hf_logprobs(model, sampled))


def test_a_change_to_the_tied_embedding_alone_reaches_the_engine(engine_model, tiny_tokenizer, prompts):
    model = copy.deepcopy(engine_model)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    generator = VLLMGenerator(model, tiny_tokenizer, SETTINGS)
    before = generator.generate(prompts, GREEDY)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(-1.5)  # the LM head's rows change with it
    generator.load_weights(model)
    after = generator.generate(prompts, GREEDY)
    assert after != before
    assert after == HFGenerator(model, tiny_tokenizer).generate(prompts, GREEDY)


def test_lora_runs_merged_weights_and_leaves_the_base_bit_identical(engine_model, tiny_tokenizer, prompts):
    from crisp.config import LoraSpec

    model = prepare_for_training(copy.deepcopy(engine_model), lora=LoraSpec(r=4, alpha=8))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)  # LoRA starts at B = 0: give the adapter an effect
    base_before = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    generator = VLLMGenerator(model, tiny_tokenizer, SETTINGS)
    generator.load_weights(model)
    after = model.get_base_model().state_dict()
    assert base_before.keys() == after.keys()
    assert all(torch.equal(base_before[k], after[k]) for k in after)  # base and adapters bit-identical

    merged = copy.deepcopy(model).merge_and_unload().eval()
    ours = generator.generate(prompts, GREEDY)
    assert ours == HFGenerator(merged, tiny_tokenizer).generate(prompts, GREEDY)
    assert ours != HFGenerator(engine_model, tiny_tokenizer).generate(prompts, GREEDY)  # the adapter mattered
    sampled, logprobs = generator.generate_with_logprobs(prompts, SAMPLING, seed=1)
    assert_logprobs_close(logprobs, hf_logprobs(merged, sampled))


def test_engine_weights_are_new_tensors_for_lora_and_the_model_own_otherwise(engine_model):
    from crisp.config import LoraSpec

    plain = engine_weights(engine_model)
    assert plain["model.embed_tokens.weight"] is not None
    assert plain["model.embed_tokens.weight"].data_ptr() == engine_model.get_input_embeddings().weight.data_ptr()
    lora = prepare_for_training(copy.deepcopy(engine_model), lora=LoraSpec(r=2, alpha=4))
    merged = engine_weights(lora)
    assert set(merged) == set(plain)  # Hugging Face names, no adapter tensors
    base = lora.get_base_model()
    q_proj = base.model.layers[0].self_attn.q_proj
    assert merged["model.layers.0.self_attn.q_proj.weight"].data_ptr() != q_proj.base_layer.weight.data_ptr()


def test_seeds_give_the_same_rollouts_in_any_batch_slice_or_rebuilt_engine(
    engine, engine_model, tiny_tokenizer, prompts
):
    whole = engine.generate(prompts, SAMPLING, seed=11)
    assert whole == engine.generate(prompts, SAMPLING, seed=11)
    assert [r.token_ids for r in whole] != [r.token_ids for r in engine.generate(prompts, SAMPLING, seed=12)]
    first = [r.token_ids for r in whole[: SAMPLING.n]]
    assert len(set(first)) > 1  # the n samples of a prompt are different draws

    # two slices, as two data-parallel ranks take them, and a reversed batch
    cut = len(prompts) // 2
    sliced = engine.generate(prompts[:cut], SAMPLING, seed=11) + engine.generate(
        prompts[cut:], SAMPLING, seed=11, first_index=cut
    )
    assert sliced == whole
    one = engine.generate([prompts[3]], SAMPLING, seed=11, first_index=3)
    assert one == whole[3 * SAMPLING.n : 4 * SAMPLING.n]

    states = random.getstate(), np.random.get_state(), torch.get_rng_state(), torch.get_num_threads()
    rebuilt = VLLMGenerator(engine_model, tiny_tokenizer, SETTINGS)
    assert random.getstate() == states[0]
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), states[1]) if isinstance(a, np.ndarray))
    assert torch.equal(torch.get_rng_state(), states[2])
    assert torch.get_num_threads() == states[3]
    torch.set_num_threads(2)  # vLLM's CPU worker disables set_num_threads; crisp restores it
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)
    assert rebuilt.generate(prompts, SAMPLING, seed=11) == whole


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """The chi-square quantile at the standard normal's z (3.09: p = 0.001), Wilson-Hilferty."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(counts: Counter, probs: torch.Tensor, samples: int) -> tuple[float, int]:
    """Pearson's statistic over the tokens expected >= 5 times, the rest pooled into one bin."""
    expected = probs * samples
    big = (expected >= 5).nonzero().flatten().tolist()
    observed = [counts.get(t, 0) for t in big]
    stat = sum((o - expected[t].item()) ** 2 / expected[t].item() for o, t in zip(observed, big))
    rest_expected = samples - expected[big].sum().item()
    rest_observed = samples - sum(observed)
    if rest_expected >= 5:
        stat += (rest_observed - rest_expected) ** 2 / rest_expected
        return stat, len(big)
    return stat, len(big) - 1


def warped(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        ordered, order = probs.sort(descending=True)
        keep = ordered.cumsum(0) - ordered < top_p  # the smallest set whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], ordered[keep])
        probs /= probs.sum()
    return probs


def test_sampling_follows_the_models_distribution(tiny_tokenizer, prompts):
    """At T = 1 the first sampled token's frequencies over 3,000 seeded requests match the model's
    softmax; the same test against a wrong temperature or without the top-p cut fails, so it can tell."""
    model = build_tiny_model(tiny_tokenizer, architecture="qwen3", seed=0, **ENGINE_TINY)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.12)  # a spread-out distribution: many tokens with a fair share
    model.eval()
    generator = VLLMGenerator(model, tiny_tokenizer, SETTINGS)
    prompt = prompts[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].double()  # (V,)
    samples = 3000

    def first_tokens(temperature: float, top_p: float) -> Counter:
        sampling = SamplingConfig(n=samples, temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=1)
        return Counter(r.token_ids[0] for r in generator.generate([prompt], sampling, seed=0))

    plain = first_tokens(1.0, 1.0)
    stat, df = chi_square(plain, warped(logits, 1.0, 1.0), samples)
    assert df >= 10, "too few tokens with a fair share: the test would have no power"
    assert stat < chi_square_critical(df), (stat, df)
    stat, df = chi_square(plain, warped(logits, 0.8, 1.0), samples)  # a wrong temperature is caught
    assert stat > chi_square_critical(df), (stat, df)

    cut = first_tokens(1.0, 0.6)
    stat, df = chi_square(cut, warped(logits, 1.0, 0.6), samples)
    assert stat < chi_square_critical(df), (stat, df)
    stat, df = chi_square(cut, warped(logits, 1.0, 1.0), samples)  # top-p ignored would be caught
    assert stat > chi_square_critical(df), (stat, df)


def test_lengths_that_do_not_fit_are_errors_naming_the_key_before_any_compute(
    engine, engine_model, tiny_tokenizer, prompts
):
    with pytest.raises(ConfigError, match="vllm.max_model_len"):
        engine.generate(prompts, GREEDY, max_new_tokens=256 - min(map(len, prompts)) + 1)
    with pytest.raises(ConfigError, match="vllm.max_model_len"):
        VLLMGenerator(engine_model, tiny_tokenizer, SETTINGS, max_new_tokens=256)


def test_cpu_settings_that_would_split_a_seeded_prefill_are_errors(engine_model, tiny_tokenizer, prompts):
    chunked = SETTINGS.model_copy(update={"enable_chunked_prefill": True})
    with pytest.raises(ConfigError, match="vllm.enable_chunked_prefill"):
        VLLMGenerator(engine_model, tiny_tokenizer, chunked)
    small = chunked.model_copy(update={"max_num_batched_tokens": 256})
    generator = VLLMGenerator(engine_model, tiny_tokenizer, small)
    with pytest.raises(ConfigError, match="vllm.max_num_batched_tokens"):
        generator.generate(prompts, SAMPLING, seed=0)  # 3 x 8 prompts: more than 256 prompt tokens
    assert generator.generate(prompts[:2], GREEDY) == HFGenerator(engine_model, tiny_tokenizer).generate(
        prompts[:2], GREEDY
    )  # within the budget it runs


# ---------------------------------------------------------------------------------------------
# training runs on the engine: kill -9 and resume, two processes
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_model_dir(tiny_tokenizer, tmp_path_factory):
    from crisp.modeling import save_model

    directory = tmp_path_factory.mktemp("engine_model")
    save_model(build_tiny_model(tiny_tokenizer, architecture="qwen3", seed=0, **ENGINE_TINY), tiny_tokenizer, directory)
    return directory


ENGINE_ROLLOUT = {"backend": "vllm", "vllm": {"max_model_len": 256, "kv_cache_gib": 0.25}}


@pytest.mark.slow
def test_a_vllm_run_killed_and_resumed_equals_an_uninterrupted_one(engine_model_dir, tmp_path):
    """As test_resume's kill -9 test, on the engine: the resumed run's engine gets the checkpoint's
    weights, and bitwise the same weights, metrics and rollouts come out."""
    from test_resume import SELFDISTILL, kill_and_resume, read_jsonl

    base = {**SELFDISTILL, "rollout": {**SELFDISTILL["rollout"], **ENGINE_ROLLOUT}}
    kill_and_resume(base, engine_model_dir, tmp_path, deadline_s=600)
    rollouts = read_jsonl(tmp_path / "straight" / "rollouts.jsonl")
    assert len({r["response"] for r in rollouts}) > 1  # the engine sampled, and differently over the steps


@pytest.mark.slow
def test_two_processes_train_on_one_engine_each(engine_model_dir, tmp_path):
    """`accelerate launch` with 2 processes: each rank's engine generates that rank's share; both
    ranks end with the same weights, and the rollouts are the ones one process samples."""
    import yaml
    from test_distributed import configs, launch_two_processes, metrics

    from crisp import cli

    data = configs(tmp_path, engine_model_dir)["selfdistill"]
    data = {**data, "rollout": {**data["rollout"], **ENGINE_ROLLOUT}, "eval": {**data["eval"], "limit": 2}}
    path = tmp_path / "selfdistill.yaml"
    path.write_text(yaml.safe_dump(data))
    two, one = tmp_path / "two", tmp_path / "one"
    # (vLLM's own process groups keep a few gloo threads past crisp's end_processes; the ranks
    # still exit cleanly, which launch_two_processes checks)
    launch_two_processes(tmp_path, [["train", str(path), f"output_dir={two}"]], check_threads=False)
    rank0, rank1 = (torch.load(two / f"weights-rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert (two / "model" / "model.safetensors").exists()

    cli.run(["train", str(path), f"output_dir={one}"])
    m2, m1 = metrics(two), metrics(one)
    assert [m["rollout/mean_tokens"] for m in m2] == [m["rollout/mean_tokens"] for m in m1]
    assert m2[-1]["eval/accuracy"] == m1[-1]["eval/accuracy"]
