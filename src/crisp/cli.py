"""The `crisp` command line: argument parsing, config building and error reporting; the work is
done by the library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from crisp import __version__
from crisp.config import EVAL_SAMPLING, ConfigError
from crisp.data.loaders import DataError, MissingDependency

DESCRIPTION = """\
Post-train reasoning models to think shorter without getting worse (CRISP, OPSD, SIRI, TFPI), and
evaluate them under one harness."""

EXAMPLES = """\
examples:
  crisp demo                                 train a tiny model, compress it, print the table
  crisp recipes                              the packaged configs, one line each
  crisp train crisp-qwen3-8b data.source=dapo_math_17k.jsonl
  crisp train my.yaml optim.lr=1e-5          a config file, with key=value overrides
  crisp eval --model runs/x/model --benchmark math500 --k 8 --out runs/eval-x
  crisp compare runs/eval-base runs/eval-x --out runs/compare"""


def is_main_process() -> bool:
    """False on the ranks other than 0 of an `accelerate launch` (they print nothing)."""
    from accelerate import PartialState

    return PartialState().is_main_process


def cmd_train(args) -> int:
    from crisp.config import load_config
    from crisp.resources import resolve_config

    cfg = load_config(resolve_config(args.config), args.overrides)
    from crisp.driver import TrainingStopped, train

    try:
        final = train(cfg)
    except TrainingStopped as error:  # the run went wrong, not the input: exit code 1, no traceback
        if is_main_process():
            print(f"crisp: stopped: {error}", file=sys.stderr)
        return 1
    if is_main_process():
        print(f"model saved to {final}")
    return 0


def cmd_eval(args) -> None:
    from crisp.evaluate import evaluate_benchmarks, result_dir
    from crisp.report import format_table

    cfg, outputs, baseline_paths = _eval_from_config(args) if args.config else _eval_from_flags(args)
    modes = cfg.modes or [None]
    baselines = {
        (name, mode): _baseline(path, mode) if path else None for name, path in baseline_paths.items() for mode in modes
    }
    summaries = evaluate_benchmarks(cfg, outputs, baselines)
    if not is_main_process():
        return
    name = Path(cfg.model.path).name
    for benchmark in cfg.benchmarks:
        rows = {}  # the modes side by side, each with its baseline
        for mode in modes:
            label = f" ({mode})" if mode else ""
            if baselines[(benchmark, mode)] is not None:
                rows[f"baseline{label}"] = baselines[(benchmark, mode)]
            rows[f"{name}{label}"] = summaries[(benchmark, mode)]
        baseline = next((row for row in rows if row.startswith("baseline")), None)
        print(f"{benchmark}:")
        print(format_table(rows, baseline=baseline))
        if baseline and len(modes) > 1:
            print(f"reduction against {baseline}")
        folders = [result_dir(outputs[benchmark], mode) for mode in modes]
        print(f"wrote {', '.join(f'{f}/summary.json' for f in folders)} and samples.jsonl")


def _eval_from_config(args):
    """`crisp eval --config FILE key=value ...`: the config, and per benchmark its output folder
    (output_dir/<name>) and baseline folder (baseline/<name>, or None)."""
    from crisp.config import EvalRunConfig, load_config
    from crisp.resources import resolve_config

    if args.model or args.benchmark or args.out or args.thinking_free or args.modes:
        raise ConfigError(
            "--config: give --model, --benchmark, --out, --thinking-free and --modes as overrides "
            "(model.path=..., benchmarks=[...], output_dir=..., prompt.thinking_free=true, "
            "modes=[...]) or leave --config out"
        )
    cfg = load_config(resolve_config(args.config), args.overrides, EvalRunConfig)
    outputs = {name: Path(cfg.output_dir) / Path(name).stem for name in cfg.benchmarks}
    baselines = {name: Path(cfg.baseline) / Path(name).stem if cfg.baseline else None for name in cfg.benchmarks}
    return cfg, outputs, baselines


def _eval_from_flags(args):
    """`crisp eval --model M --benchmark B --out DIR ...`: the config the flags make, and the one
    benchmark's output folder and baseline (a summary.json or a folder of them, or None)."""
    from crisp.config import EvalRunConfig, validate

    missing = [
        flag
        for flag, value in (("--model", args.model), ("--benchmark", args.benchmark), ("--out", args.out))
        if not value
    ]
    if missing:
        raise ConfigError(f"{', '.join(missing)}: required without --config")
    if args.overrides:
        raise ConfigError(f"{args.overrides[0]}: key=value overrides need --config")
    if args.k < 1:
        raise ConfigError("--k: must be at least 1")
    data = {
        "model": {"path": args.model, "dtype": args.dtype, "trust_remote_code": args.trust_remote_code},
        "benchmarks": [args.benchmark],
        "output_dir": args.out,
        "k": args.k,
        "sampling": {
            "temperature": args.temperature,
            "top_p": args.top_p,
            "top_k": args.top_k,
            "max_new_tokens": args.max_new_tokens,
        },
        "prompt": {
            "template": args.template or ("plain" if args.benchmark == "synthetic" else "dapo"),
            "enable_thinking": args.enable_thinking,
            "thinking_free": args.thinking_free,
        },
        "instruction": args.instruction,
        "grader": args.grader,
        "limit": args.limit,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "mixed_precision": args.mixed_precision,
        "backend": args.backend,
        "modes": [m for m in (args.modes or "").split(",") if m],
        "report_to": args.report_to,
    }
    if args.markers is not None:  # otherwise the default markers
        data["anatomy"] = {"markers": args.markers}
    baseline = Path(args.baseline) if args.baseline else None
    return validate(data, EvalRunConfig), {args.benchmark: Path(args.out)}, {args.benchmark: baseline}


def _baseline(path: Path, mode: str | None) -> dict:
    """The baseline summary for one mode: `path` itself if it is a file, else the summary.json in its
    <mode> subfolder (a baseline evaluated in several modes) or in the folder itself."""
    from crisp.evaluate import result_dir

    if path.is_dir():
        in_mode = result_dir(path, mode) / "summary.json"
        path = in_mode if in_mode.is_file() else path / "summary.json"
    return _summary(path)


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _summary(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"baseline {path} does not exist (run `crisp eval` for the baseline first)")
    return json.loads(path.read_text())


def cmd_demo(args) -> None:
    from crisp.demo import run_demo

    run_demo(
        args.out, methods=[m for m in args.methods.split(",") if m], configs_dir=args.configs, backend=args.backend
    )


def cmd_recipes(args) -> None:
    from crisp.resources import configs_dir, describe_configs

    rows = describe_configs()
    width = max(len(name) for name, _ in rows)
    print(f"packaged configs (crisp train NAME, crisp eval --config NAME; the files are in {configs_dir()}):")
    for name, summary in rows:
        print(f"  {name:<{width}}  {summary}")


def cmd_compare(args) -> None:
    from crisp.report import compare_runs

    compare_runs(args.runs, out=args.out, baseline=args.baseline)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crisp", description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"crisp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train", help="train with a YAML config (method: sft, selfdistill for CRISP and OPSD, grpo for SIRI and TFPI)"
    )
    train.add_argument("config", help="a YAML file, or the name of a packaged config (see `crisp recipes`)")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-5")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a model on a benchmark, or on several with --config")
    ev.add_argument("--config", help="an evaluation YAML file or packaged config name (e.g. eval) instead of the flags")
    ev.add_argument("overrides", nargs="*", help="key=value overrides of --config, e.g. model.path=runs/x/model")
    ev.add_argument("--model", help="local model directory or HF id")
    ev.add_argument("--benchmark", help="synthetic, math500, aime24, aime25, gsm8k, or a file")
    ev.add_argument("--k", type=int, default=1, help="samples per problem")
    ev.add_argument("--out", help="folder for samples.jsonl and summary.json")
    ev.add_argument("--baseline", help="a baseline summary.json: adds compression ratio and dAcc/CR")
    ev.add_argument("--instruction", help="prepend an instruction (v1, v2, percent, word_limit or text)")
    ev.add_argument(
        "--template", default=None, help="student prompt template (default: plain for synthetic, else dapo)"
    )
    ev.add_argument("--temperature", type=float, default=EVAL_SAMPLING.temperature)
    ev.add_argument("--top-p", type=float, default=EVAL_SAMPLING.top_p)
    ev.add_argument("--top-k", type=int, default=EVAL_SAMPLING.top_k)
    ev.add_argument("--max-new-tokens", type=int, default=EVAL_SAMPLING.max_new_tokens)
    ev.add_argument("--limit", type=int, help="evaluate only the first N problems")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--grader", choices=["exact", "math-verify"], help="default: exact for synthetic")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ev.add_argument("--mixed-precision", default="no", choices=["no", "bf16"], help="bf16 autocast")
    ev.add_argument("--enable-thinking", type=lambda s: s.lower() == "true", default=None)
    ev.add_argument(
        "--thinking-free",
        action="store_true",
        help="thinking-free prompts: each ends with an empty closed <think> block (TFPI)",
    )
    ev.add_argument(
        "--modes", default=None, help="evaluate in several modes, e.g. thinking,thinking_free: each into --out/<mode>/"
    )
    ev.add_argument("--trust-remote-code", action="store_true")
    ev.add_argument(
        "--report-to",
        type=_comma_list,
        default="",
        help="comma-separated experiment trackers: tensorboard, wandb, mlflow, trackio, ... "
        "(with --config: report_to=[...])",
    )
    ev.add_argument(
        "--markers",
        type=_comma_list,
        default=None,
        help="comma-separated phrases whose rate per 1,000 tokens the summary reports "
        "(default: crisp.anatomy.DEFAULT_MARKERS; with --config: anatomy.markers=[...])",
    )
    ev.add_argument(
        "--backend",
        default="hf",
        choices=["hf", "vllm"],
        help="generate with HF generate or a vLLM engine (with --config: backend=vllm)",
    )
    ev.set_defaults(func=cmd_eval)

    demo = sub.add_parser("demo", help="train a tiny reasoning model, compress it, report")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--methods", default="crisp", help="comma-separated: crisp, opsd, siri, tfpi")
    demo.add_argument("--configs", default=None, help="folder with the demo YAML files (default: built in)")
    demo.add_argument(
        "--backend",
        default="hf",
        choices=["hf", "vllm"],
        help="rollouts and evaluations on HF generate or a vLLM engine (the base's SFT is the same)",
    )
    demo.set_defaults(func=cmd_demo)

    recipes = sub.add_parser("recipes", help="list the packaged configs (recipes, demo, accelerate files)")
    recipes.set_defaults(func=cmd_recipes)

    compare = sub.add_parser("compare", help="compare evaluated runs: table and Pareto plot")
    compare.add_argument("runs", nargs="+", help="run directories or summary.json files")
    compare.add_argument("--out", default=None, help="folder for the table and plot")
    compare.add_argument("--baseline", default=None, help="the run to compare against (default: the first)")
    compare.set_defaults(func=cmd_compare)
    return parser


def run(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code: 0, 1 for a stopped run, 2 for bad input (the message
    printed says what to fix). A process may run several; `main` ends the process's part."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ConfigError, DataError, FileNotFoundError, MissingDependency) as error:  # the message says what to fix
        print(f"crisp: error: {error}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> None:
    """The `crisp` program: one command, then, in a run started by `accelerate launch`, the end of
    this rank's process group (see crisp.distributed.end_processes), then the exit code."""
    code = run(argv)
    if "torch.distributed" in sys.modules:  # a command that never imported it started no process group
        from crisp.distributed import end_processes

        end_processes()  # every rank gets here alike: the errors above are the same on every rank
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
