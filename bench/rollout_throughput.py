"""Benchmark 4: rollout throughput of the generation backends.

Tokens per second of `crisp.rollout.HFGenerator` (Hugging Face `generate`, the default backend)
against `crisp.rollout.KVCacheGenerator` (a plain loop: one prefill, then one token per forward
from the KV cache) and `crisp.rollout_vllm.VLLMGenerator` (a vLLM engine in this process, when
vLLM is installed: `make setup-vllm`), on randomly initialised models:

  tiny    the demo base's shape: Qwen3, hidden 128, 2 layers, 4 heads, MLP 256, the synthetic
          task's word vocabulary and prompts, 256 prompts (--tiny-prompts)
  tiny64  the same model and prompts, 64 of them
  32k     the benchmarks' Qwen3 shape: hidden 256, 4 layers, a 32,000-token vocabulary

All sample alike (temperature 1, no top-k/top-p, CRISP's rollout setting). HF and the plain loop
draw the same tokens with the same seed (checked here on every run), so they do the same work; the
engine draws its own tokens (its own seeded sampler), so its tokens per second are its own count
over its own time. Runs alternate between the backends; the first of each is a warm-up; medians
are reported. The HF / plain time ratio is what `generate`'s general machinery costs;
vllm_speedup is the engine's tokens per second over HF generate's. The engine's start-up and one
weight sync are timed once per model, outside the runs.

    python bench/rollout_throughput.py          # defaults: about 5 minutes on 2 idle cores
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import common
import torch


def parse_args(argv=None):
    parser = common.parser(__doc__)
    parser.add_argument("--tiny-prompts", type=int, default=256, help="prompts per batch on the tiny model")
    parser.add_argument("--small-prompts", type=int, default=64, help="prompts per batch of the tiny64 runs")
    parser.add_argument("--tiny-tokens", type=int, default=128, help="max new tokens on the tiny model")
    parser.add_argument("--big-prompts", type=int, default=8, help="prompts per batch on the 32k model")
    parser.add_argument("--big-tokens", type=int, default=256, help="max new tokens on the 32k model")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per backend (after one warm-up each)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-vllm", action="store_true", help="leave the vLLM engine out")
    return parser.parse_args(argv)


def tiny_setup(prompts: int):
    from crisp.data import synthetic
    from crisp.modeling import build_tiny_model, build_word_tokenizer
    from crisp.prompts import PromptBuilder

    tokenizer = build_word_tokenizer(synthetic.vocabulary_texts(traces=300))
    model = build_tiny_model(
        tokenizer, architecture="qwen3", hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256, seed=0
    )
    builder = PromptBuilder(tokenizer, template="plain")
    problems = synthetic.test_problems()  # 200 problems: cycled for larger batches
    return model, tokenizer, [builder.student_ids(problems[i % len(problems)]) for i in range(prompts)]


def big_setup(prompts: int, scratch: Path):
    from crisp.modeling import load_model, load_tokenizer

    model_dir, words = common.build_model(
        scratch / "model32k", vocab=32000, hidden=256, layers=4, heads=4, intermediate=768
    )
    tokenizer = load_tokenizer(str(model_dir))
    generator = torch.Generator().manual_seed(0)
    ids = [common.chat_ids(tokenizer, common.random_text(64, generator, words)) for _ in range(prompts)]
    return load_model(str(model_dir)), tokenizer, ids


def start_engine(model, tokenizer, max_new_tokens: int):
    """A VLLMGenerator for `model` and what its start-up and one weight sync took."""
    from crisp.config import VLLMSettings
    from crisp.rollout_vllm import VLLMGenerator

    wall = time.perf_counter()
    # max_model_len: the model's positions
    engine = VLLMGenerator(model, tokenizer, VLLMSettings(), max_new_tokens=max_new_tokens)
    started = time.perf_counter() - wall
    wall = time.perf_counter()
    engine.load_weights(model)
    return engine, {"startup_s": started, "sync_s": time.perf_counter() - wall}


def measure(name: str, model, tokenizer, prompts, max_new_tokens: int, reps: int, engine=None) -> dict:
    from crisp.config import SamplingConfig
    from crisp.rollout import HFGenerator, KVCacheGenerator

    sampling = SamplingConfig(n=1, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens)
    backends = {
        "hf": HFGenerator(model, tokenizer, batch_size=len(prompts)),
        "plain": KVCacheGenerator(model, tokenizer, batch_size=len(prompts)),
    }
    if engine is not None:
        backends["vllm"] = engine
    times = {key: [] for key in backends}
    tokens = {key: [] for key in backends}
    for rep in range(reps + 1):
        outputs = {}
        for key in backends if rep % 2 == 0 else list(backends)[::-1]:
            wall = time.perf_counter()
            outputs[key] = backends[key].generate(prompts, sampling, seed=rep)
            if rep > 0:
                times[key].append(time.perf_counter() - wall)
                tokens[key].append(sum(r.num_tokens for r in outputs[key]))
        if outputs["hf"] != outputs["plain"]:
            raise AssertionError(f"{name}: the two backends drew different tokens with the same seed")
    result = {
        key: {
            "time": common.median(times[key]),
            "tokens": common.median(tokens[key]),
            "tokens_per_s": common.median([n / t for n, t in zip(tokens[key], times[key])]),
        }
        for key in backends
    }
    result["tokens"] = result["hf"]["tokens"]
    print(
        f"{name}: " + "; ".join(f"{key} {', '.join(f'{t:.2f}' for t in times[key])} s" for key in backends), flush=True
    )
    return result


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    use_vllm = not args.no_vllm and vllm_available()
    results, engine_costs = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        model, tokenizer, prompts = tiny_setup(args.tiny_prompts)
        engine = None
        if use_vllm:
            engine, engine_costs["tiny"] = start_engine(model, tokenizer, args.tiny_tokens)
        shape = f"Qwen3, hidden 128, 2 layers, MLP 256, vocabulary {len(tokenizer)}"
        for name, batch in (("tiny", prompts), ("tiny64", prompts[: args.small_prompts])):
            results[name] = measure(name, model, tokenizer, batch, args.tiny_tokens, args.reps, engine)
            results[name]["shape"] = f"{shape}; {len(batch)} prompts x up to {args.tiny_tokens} tokens"
        if engine is not None:
            engine.close()  # one engine at a time in a process
        model, tokenizer, prompts = big_setup(args.big_prompts, Path(scratch))
        engine = None
        if use_vllm:
            engine, engine_costs["32k"] = start_engine(model, tokenizer, args.big_tokens)
        results["32k"] = measure("32k", model, tokenizer, prompts, args.big_tokens, args.reps, engine)
        results["32k"]["shape"] = (
            f"Qwen3, hidden 256, 4 layers, vocabulary {len(tokenizer)}; "
            f"{len(prompts)} prompts x up to {args.big_tokens} tokens"
        )

    print(
        f"\nRollout throughput, HF generate vs a plain KV-cached loop{' vs vLLM' if use_vllm else ''} "
        f"({args.threads} thread(s), temperature 1)"
    )
    print(f"machine: {common.machine()}\n")
    rows = []
    for name, figures in results.items():
        hf, plain = figures["hf"], figures["plain"]
        row = [
            name,
            figures["shape"],
            f"{figures['tokens']:.0f}",
            f"{hf['tokens_per_s']:.0f}",
            f"{plain['tokens_per_s']:.0f}",
            f"{hf['time'] / plain['time']:.2f}",
        ]
        if use_vllm:
            vllm = figures["vllm"]["tokens_per_s"]
            row += [f"{vllm:.0f}", f"{vllm / hf['tokens_per_s']:.2f}"]
        rows.append(row)
    headers = [
        "model",
        "shape and batch",
        "tokens (HF)",
        "HF generate (tok/s)",
        "plain loop (tok/s)",
        "time ratio HF / plain",
    ] + (["vLLM (tok/s)", "vLLM / HF tok/s"] if use_vllm else [])
    print(common.table(headers, rows))
    for name, costs in engine_costs.items():
        print(
            f"vLLM engine on {name}: start-up {costs['startup_s']:.1f} s, "
            f"one weight sync {costs['sync_s'] * 1000:.0f} ms"
        )
    fields = []
    for name, figures in results.items():
        fields += [
            f"time_ratio_{name}={figures['hf']['time'] / figures['plain']['time']:.3f}",
            f"hf_tokens_per_s_{name}={figures['hf']['tokens_per_s']:.0f}",
            f"plain_tokens_per_s_{name}={figures['plain']['tokens_per_s']:.0f}",
        ]
        if use_vllm:
            fields += [
                f"vllm_tokens_per_s_{name}={figures['vllm']['tokens_per_s']:.0f}",
                f"vllm_speedup_{name}={figures['vllm']['tokens_per_s'] / figures['hf']['tokens_per_s']:.3f}",
            ]
    print("\nRESULT " + " ".join(fields))


def vllm_available() -> bool:
    from crisp.config import ConfigError
    from crisp.rollout_vllm import import_vllm

    try:
        import_vllm()
    except ConfigError as error:
        print(f"vLLM left out: {error}")
        return False
    return True


if __name__ == "__main__":
    main()
