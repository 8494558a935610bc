"""crisp {demo,train,eval,compare}: parse arguments, build the config, call the library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from crisp.config import ConfigError
from crisp.data.loaders import DataError


def cmd_train(args) -> None:
    from crisp.config import load_config

    cfg = load_config(args.config, args.overrides)
    if cfg.method == "sft":
        from crisp.sft import train_sft as train
    elif cfg.method == "selfdistill":
        from crisp.selfdistill import train_selfdistill as train
    elif cfg.method == "grpo":
        from crisp.grpo import train_grpo as train
    from crisp.loop import TrainingStopped

    try:
        print(f"model saved to {train(cfg)}")
    except TrainingStopped as error:  # the run went wrong, not the input: exit code 1, no traceback
        print(f"crisp: stopped: {error}", file=sys.stderr)
        sys.exit(1)


def cmd_eval(args) -> None:
    from crisp.config import SamplingConfig, validate
    from crisp.data.loaders import load_problems
    from crisp.evaluate import compare_to_baseline, evaluate, format_table, write_results
    from crisp.modeling import load_model, load_tokenizer
    from crisp.prompts import PromptBuilder, resolve_instruction

    if args.k < 1:
        raise ConfigError("--k: must be at least 1")
    sampling = validate(
        {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
         "max_new_tokens": args.max_new_tokens},
        SamplingConfig,
    )
    baseline = json.loads(Path(args.baseline).read_text()) if args.baseline else None
    problems = load_problems(args.benchmark, limit=args.limit)  # bad data fails before the model loads
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    model = load_model(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    builder = PromptBuilder(tokenizer, template=args.template, enable_thinking=args.enable_thinking)
    records, summary = evaluate(
        model, tokenizer, problems, builder=builder, sampling=sampling, k=args.k, seed=args.seed,
        instruction=resolve_instruction(args.instruction), grader=args.grader, batch_size=args.batch_size,
    )
    summary.update({"model": args.model, "benchmark": args.benchmark})
    if baseline is not None:
        summary["vs_baseline"] = compare_to_baseline(summary, baseline)
    write_results(args.out, records, summary)
    rows = {"baseline": baseline, Path(args.model).name: summary} if baseline else {Path(args.model).name: summary}
    print(format_table(rows, baseline="baseline" if baseline else None))
    print(f"wrote {args.out}/summary.json and samples.jsonl")


def cmd_demo(args) -> None:
    from crisp.demo import run_demo

    run_demo(args.out, methods=[m for m in args.methods.split(",") if m], configs_dir=args.configs)


def cmd_compare(args) -> None:
    from crisp.report import compare_runs

    compare_runs(args.runs, out=args.out, baseline=args.baseline)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crisp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train with a YAML config (sft, selfdistill, grpo)")
    train.add_argument("config")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-5")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a model on a benchmark")
    ev.add_argument("--model", required=True, help="local model directory or HF id")
    ev.add_argument("--benchmark", required=True, help="synthetic, math500, aime24, aime25, gsm8k, or a file")
    ev.add_argument("--k", type=int, default=1, help="samples per problem")
    ev.add_argument("--out", required=True)
    ev.add_argument("--baseline", help="a baseline summary.json: adds compression ratio and dAcc/CR")
    ev.add_argument("--instruction", help="prepend an instruction (v1, v2, percent, word_limit or text)")
    ev.add_argument("--template", default=None, help="student prompt template (default: plain for synthetic, else dapo)")
    ev.add_argument("--temperature", type=float, default=0.6)
    ev.add_argument("--top-p", type=float, default=0.95)
    ev.add_argument("--top-k", type=int, default=20)
    ev.add_argument("--max-new-tokens", type=int, default=30_000)
    ev.add_argument("--limit", type=int, help="evaluate only the first N problems")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--grader", choices=["exact", "math-verify"], help="default: exact for synthetic")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ev.add_argument("--enable-thinking", type=lambda s: s.lower() == "true", default=None)
    ev.add_argument("--trust-remote-code", action="store_true")
    ev.set_defaults(func=cmd_eval)

    demo = sub.add_parser("demo", help="train a tiny reasoning model, compress it, report")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--methods", default="crisp", help="comma-separated: crisp, opsd, siri")
    demo.add_argument("--configs", default=None, help="folder with the demo YAML files (default: built in)")
    demo.set_defaults(func=cmd_demo)

    compare = sub.add_parser("compare", help="compare evaluated runs: table and Pareto plot")
    compare.add_argument("runs", nargs="+", help="run directories or summary.json files")
    compare.add_argument("--out", default=None, help="folder for the table and plot")
    compare.add_argument("--baseline", default=None, help="the run to compare against (default: the first)")
    compare.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if getattr(args, "template", "unset") is None:
        args.template = "plain" if args.benchmark == "synthetic" else "dapo"
    try:
        args.func(args)
    except (ConfigError, DataError, FileNotFoundError) as error:  # the message says what to fix
        print(f"crisp: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
