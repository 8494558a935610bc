"""What the synthetic task's generating process implies, before any model: accuracy, mean tokens and
the truncated share per level for each style, as a writer that follows it exactly samples it at the
evaluation's temperature (0.6) and length cap (256 tokens), counted with the demo's tokenizer.

    python bench/task_process.py [--temperature 0.6] [--per-level 2000]

A trained model's own lookup and arithmetic errors come on top of these figures.
"""

from __future__ import annotations

import argparse

from crisp.data import synthetic
from crisp.modeling import build_word_tokenizer
from crisp.prompts import prompt_texts

STYLES = {
    "base (plain prompt)": synthetic.VERBOSE,
    "prompt-only v1": synthetic.CONCISE_V1,
    "prompt-only v2": synthetic.CONCISE_V2,
    "ideal (checks on risky steps only)": synthetic.IDEAL,
    "reference reader (OPSD teacher)": synthetic.REFERENCE,
    "thinking-free": synthetic.THINKING_FREE,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--per-level", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()
    tokenizer = build_word_tokenizer(synthetic.vocabulary_texts(0) + prompt_texts())
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    print(f"T = {args.temperature}, cap {args.max_tokens} tokens, {args.per_level} chains per level")
    print("| policy | acc | tokens | " + " | ".join(f"L{lv}" for lv in synthetic.LEVELS) + " |")
    print("|---|---|---|" + "---|" * len(synthetic.LEVELS))
    for name, style in STYLES.items():
        figures = synthetic.expected_figures(
            style,
            temperature=args.temperature,
            per_level=args.per_level,
            count_tokens=count,
            max_tokens=args.max_tokens,
        )
        accuracy = sum(f["accuracy"] for f in figures.values()) / len(figures)
        tokens = sum(f["mean_tokens"] for f in figures.values()) / len(figures)
        cells = [
            f"{f['accuracy']:.2f} / {f['mean_tokens']:.0f}"
            + (f", {f['truncation_rate']:.0%} cut" if f["truncation_rate"] >= 0.005 else "")
            for f in figures.values()
        ]
        print(f"| {name} | {accuracy:.3f} | {tokens:.0f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
