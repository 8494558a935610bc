"""Benchmark 4: rollout throughput of the generation backends.

Tokens per second of `crisp.rollout.HFGenerator` (Hugging Face `generate`, what the training loops
use) against `crisp.rollout.KVCacheGenerator` (a plain loop: one prefill, then one token per forward
from the KV cache), on two randomly initialised models:

  tiny  a demo-size model: Llama, hidden 128, 2 layers, MLP 512 (the demo base's shape before it
        moved to Qwen3 with MLP 256), the synthetic task's word vocabulary and prompts
  32k   the benchmarks' Qwen3 shape: hidden 256, 4 layers, a 32,000-token vocabulary

Both backends sample alike (temperature 1, no top-k/top-p, CRISP's rollout setting) and with the
same seed they draw the same tokens (checked here on every run), so they do the same work. Runs
alternate between the backends; the first of each is a warm-up; medians are reported. The time
ratio is HF's time over the plain loop's: what `generate`'s general machinery costs.

    python bench/rollout_throughput.py          # defaults: about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import common


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny-prompts", type=int, default=64, help="prompts per batch on the tiny model")
    parser.add_argument("--tiny-tokens", type=int, default=128, help="max new tokens on the tiny model")
    parser.add_argument("--big-prompts", type=int, default=8, help="prompts per batch on the 32k model")
    parser.add_argument("--big-tokens", type=int, default=256, help="max new tokens on the 32k model")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per backend (after one warm-up each)")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def tiny_setup(prompts: int):
    from crisp.data import synthetic
    from crisp.modeling import build_tiny_model, build_word_tokenizer
    from crisp.prompts import PromptBuilder

    tokenizer = build_word_tokenizer(synthetic.vocabulary_texts(traces=300))
    model = build_tiny_model(tokenizer, architecture="llama", hidden_size=128, num_layers=2, num_heads=4,
                             intermediate_size=512, seed=0)
    builder = PromptBuilder(tokenizer, template="plain")
    return model, tokenizer, [builder.student_ids(p) for p in synthetic.test_problems()[:prompts]]


def big_setup(prompts: int, scratch: Path):
    from crisp.modeling import load_model, load_tokenizer

    model_dir, words = common.build_model(scratch / "model32k", vocab=32000, hidden=256, layers=4, heads=4,
                                          intermediate=768)
    tokenizer = load_tokenizer(str(model_dir))
    generator = torch.Generator().manual_seed(0)
    ids = [common.chat_ids(tokenizer, common.random_text(64, generator, words)) for _ in range(prompts)]
    return load_model(str(model_dir)), tokenizer, ids


def measure(name: str, model, tokenizer, prompts, max_new_tokens: int, reps: int) -> dict:
    from crisp.config import SamplingConfig
    from crisp.rollout import HFGenerator, KVCacheGenerator

    sampling = SamplingConfig(n=1, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens)
    backends = {"hf": HFGenerator(model, tokenizer, batch_size=len(prompts)),
                "plain": KVCacheGenerator(model, tokenizer, batch_size=len(prompts))}
    times = {key: [] for key in backends}
    tokens = {}
    for rep in range(reps + 1):
        outputs = {}
        for key in (backends if rep % 2 == 0 else list(backends)[::-1]):
            wall = time.perf_counter()
            outputs[key] = backends[key].generate(prompts, sampling, seed=rep)
            if rep > 0:
                times[key].append(time.perf_counter() - wall)
        if outputs["hf"] != outputs["plain"]:
            raise AssertionError(f"{name}: the two backends drew different tokens with the same seed")
        tokens[rep] = sum(r.num_tokens for r in outputs["hf"])
    generated = common.median([tokens[rep] for rep in range(1, reps + 1)])
    result = {key: {"time": common.median(values), "tokens_per_s": generated / common.median(values)}
              for key, values in times.items()}
    result["tokens"] = generated
    print(f"{name}: HF {', '.join(f'{t:.2f}' for t in times['hf'])} s; plain "
          f"{', '.join(f'{t:.2f}' for t in times['plain'])} s", flush=True)
    return result


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        model, tokenizer, prompts = tiny_setup(args.tiny_prompts)
        results["tiny"] = measure("tiny", model, tokenizer, prompts, args.tiny_tokens, args.reps)
        results["tiny"]["shape"] = (f"Llama, hidden 128, 2 layers, vocabulary {len(tokenizer)}; "
                                    f"{len(prompts)} prompts x up to {args.tiny_tokens} tokens")
        model, tokenizer, prompts = big_setup(args.big_prompts, Path(scratch))
        results["32k"] = measure("32k", model, tokenizer, prompts, args.big_tokens, args.reps)
        results["32k"]["shape"] = (f"Qwen3, hidden 256, 4 layers, vocabulary {len(tokenizer)}; "
                                   f"{len(prompts)} prompts x up to {args.big_tokens} tokens")

    print(f"\nRollout throughput, HF generate vs a plain KV-cached loop ({args.threads} thread(s), temperature 1)")
    print(f"machine: {common.machine()}\n")
    rows = []
    for name, figures in results.items():
        hf, plain = figures["hf"], figures["plain"]
        rows.append([name, figures["shape"], f"{figures['tokens']:.0f}", f"{hf['tokens_per_s']:.0f}",
                     f"{plain['tokens_per_s']:.0f}", f"{hf['time'] / plain['time']:.2f}"])
    print(common.table(["model", "shape and batch", "tokens", "HF generate (tok/s)", "plain loop (tok/s)",
                        "time ratio HF / plain"], rows))
    print("\nRESULT " + " ".join(
        f"time_ratio_{name}={figures['hf']['time'] / figures['plain']['time']:.3f} "
        f"hf_tokens_per_s_{name}={figures['hf']['tokens_per_s']:.0f} "
        f"plain_tokens_per_s_{name}={figures['plain']['tokens_per_s']:.0f}" for name, figures in results.items()))


if __name__ == "__main__":
    main()
