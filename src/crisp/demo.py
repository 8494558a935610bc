"""`crisp demo`: train a tiny reasoning model, compress it, and compare.

base model (trained, or reused when built with the same config) -> evaluate it without and with the
concise instruction (the prompt-only baseline) -> each method on the same base and budget ->
evaluate -> table, summary.json, report.md with plots. Fixed seeds throughout.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from crisp.config import ConfigError, EvalConfig, load_config, validate
from crisp.data import synthetic
from crisp.evaluate import evaluate, format_table, write_results
from crisp.modeling import load_model, load_tokenizer
from crisp.prompts import PromptBuilder, resolve_instruction
from crisp.report import write_report

METHODS = {"crisp": "crisp.yaml", "opsd": "opsd.yaml", "siri": "siri.yaml"}


def _default_configs() -> Path:
    for candidate in (Path("configs"), Path(__file__).resolve().parents[2] / "configs"):
        if (candidate / "demo" / "base.yaml").is_file():
            return candidate
    raise FileNotFoundError("cannot find configs/demo/base.yaml; pass --configs DIR")


def ensure_base_model(cfg) -> Path:
    """Train the base model unless output_dir already holds one built from the same config."""
    from crisp.sft import train_sft

    out = Path(cfg.output_dir)
    resolved = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    marker = out / "model" / "crisp_config.yaml"
    if marker.is_file() and marker.read_text() == resolved:
        print(f"reusing the base model in {out / 'model'} (same config)")
        return out / "model"
    return train_sft(cfg)


def evaluate_row(model_dir: Path, eval_cfg: EvalConfig, out: Path, *, instruction: str | None, template: str,
                 backend: str = "hf") -> dict:
    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir))
    problems = synthetic.test_problems()
    generator = None  # HF generate
    if backend == "vllm":
        from crisp.config import VLLMSettings
        from crisp.rollout_vllm import VLLMGenerator

        generator = VLLMGenerator(model, tokenizer, VLLMSettings(), max_new_tokens=eval_cfg.sampling.max_new_tokens)
    records, summary = evaluate(
        model, tokenizer, problems, builder=PromptBuilder(tokenizer, template=template),
        sampling=eval_cfg.sampling, k=eval_cfg.k, seed=0, instruction=instruction, batch_size=eval_cfg.batch_size,
        generator=generator,
    )
    summary["model"] = str(model_dir)
    write_results(out, records, summary)
    return summary


def run_demo(out: str | Path, *, methods: list[str], configs_dir: str | Path | None = None,
             backend: str = "hf") -> dict:
    """`backend`: where the methods' rollouts and every evaluation run (hf or vllm)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    configs = Path(configs_dir) if configs_dir else _default_configs()
    out = Path(out)
    eval_cfg = validate(yaml.safe_load((configs / "demo" / "eval.yaml").read_text()), EvalConfig)
    base_cfg = load_config(configs / "demo" / "base.yaml", [f"output_dir={out / 'base'}"])
    method_cfgs = {  # validated up front: a bad config fails before minutes of training
        m: load_config(configs / "demo" / METHODS[m], [f"output_dir={out / m}", f"model.path={out / 'base' / 'model'}",
                                                       f"rollout.backend={backend}"])
        for m in methods
    }
    instruction_spec = base_cfg.mix.instruction
    template = base_cfg.prompt.template
    timings: dict[str, float] = {}

    def timed(name, fn, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        timings[name] = round(time.perf_counter() - start, 1)
        print(f"[demo] {name}: {timings[name]:.1f} s")
        return result

    base_dir = timed("train base (sft)", ensure_base_model, base_cfg)
    rows = {
        "base": timed("eval base", evaluate_row, base_dir, eval_cfg, out / "eval" / "base",
                      instruction=None, template=template, backend=backend),
        "prompt_only": timed("eval prompt_only", evaluate_row, base_dir, eval_cfg, out / "eval" / "prompt_only",
                             instruction=resolve_instruction(instruction_spec), template=template, backend=backend),
    }
    for method, cfg in method_cfgs.items():
        model_dir = timed(f"train {method}", _train, cfg)
        rows[method] = timed(f"eval {method}", evaluate_row, model_dir, eval_cfg, out / "eval" / method,
                             instruction=None, template=template, backend=backend)

    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    (out / "timings.json").write_text(json.dumps(timings, indent=2))
    notes = f"## Time per stage (s), rollouts and evaluations on {backend}\n\n"
    notes += "\n".join(f"- {k}: {v}" for k, v in timings.items())
    notes += f"\n\n`prompt_only` is the base model with the `{instruction_spec}` instruction in its prompt."
    report = write_report(out, rows, baseline="base", title="crisp demo: synthetic reasoning task", notes=notes)
    print()
    print(format_table(rows, baseline="base"))
    print(f"\nreport: {report}")
    return rows


def _train(cfg) -> Path:
    if cfg.method == "selfdistill":
        from crisp.selfdistill import train_selfdistill

        return train_selfdistill(cfg)
    if cfg.method == "grpo":
        from crisp.grpo import train_grpo

        return train_grpo(cfg)
    raise ValueError(f"demo cannot train method {cfg.method!r}")
