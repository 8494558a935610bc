"""`crisp demo`: train a tiny reasoning model, compress it, and compare.

base model (trained, or reused when built with the same config) -> evaluate it without and with
each concise instruction, v1 and v2 (the prompt-only baselines) -> each method on the same base and budget ->
evaluate -> table, summary.json, report.md with plots. Fixed seeds throughout.

With TFPI among the methods, the base and the TFPI model are also evaluated in thinking-free mode
(rows "base (thinking-free)" and "tfpi (thinking-free)"); every other row is in thinking mode.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from crisp.config import ConfigError, EvalConfig, VLLMSettings, load_config, validate
from crisp.data.synthetic import SyntheticTask
from crisp.driver import train
from crisp.evaluate import evaluate, write_results
from crisp.modeling import load_model, load_tokenizer
from crisp.prompts import PromptBuilder, resolve_instruction
from crisp.report import format_table, write_report
from crisp.resources import configs_dir as packaged_configs_dir
from crisp.rollout_vllm import build_generator

if TYPE_CHECKING:
    from crisp.methods.sft import SFTConfig

METHODS = {"crisp": "crisp.yaml", "opsd": "opsd.yaml", "siri": "siri.yaml", "tfpi": "tfpi.yaml"}
PROMPT_ONLY = ("v1", "v2")  # the instructions the base model is also evaluated with
BOTH_MODES = ("tfpi",)  # the methods whose rows (and the base's) are evaluated in thinking-free mode too


def ensure_base_model(cfg: SFTConfig) -> Path:
    """Train the base model unless output_dir already holds one built from the same config."""
    out = Path(cfg.output_dir)
    resolved = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    marker = out / "model" / "crisp_config.yaml"
    if marker.is_file() and marker.read_text() == resolved:
        print(f"reusing the base model in {out / 'model'} (same config)")
        return out / "model"
    return train(cfg)


def load(model_dir: Path) -> tuple:
    """The model saved in `model_dir` and its tokenizer."""
    return load_model(str(model_dir)), load_tokenizer(str(model_dir))


def evaluate_row(
    model_dir: Path,
    loaded: tuple,
    eval_cfg: EvalConfig,
    out: Path,
    *,
    instruction: str | None,
    template: str,
    thinking_free: bool = False,
    backend: str = "hf",
) -> dict:
    """One row of the table: the model of `model_dir` (`loaded`: it and its tokenizer) evaluated on the
    synthetic task's held-out problems; its samples and summary written to `out`."""
    model, tokenizer = loaded
    task = SyntheticTask()
    generator = build_generator(
        backend,
        VLLMSettings(),
        model,
        tokenizer,
        batch_size=eval_cfg.batch_size,
        max_new_tokens=eval_cfg.sampling.max_new_tokens,
    )
    records, summary = evaluate(
        model,
        tokenizer,
        task.eval_problems(),
        task=task,
        builder=PromptBuilder(tokenizer, template=template, thinking_free=thinking_free),
        sampling=eval_cfg.sampling,
        k=eval_cfg.k,
        seed=0,
        instruction=instruction,
        batch_size=eval_cfg.batch_size,
        generator=generator,
    )
    summary["model"] = str(model_dir)
    write_results(out, records, summary)
    return summary


def run_demo(
    out: str | Path, *, methods: list[str], configs_dir: str | Path | None = None, backend: str = "hf"
) -> dict:
    """`backend`: where the methods' rollouts and every evaluation run (hf or vllm)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    configs = Path(configs_dir) if configs_dir else packaged_configs_dir()
    if not (configs / "demo" / "base.yaml").is_file():
        raise FileNotFoundError(
            f"{configs / 'demo' / 'base.yaml'} does not exist (--configs names a folder "
            "holding demo/base.yaml, demo/eval.yaml and the method configs)"
        )
    out = Path(out)
    eval_cfg = validate(yaml.safe_load((configs / "demo" / "eval.yaml").read_text()), EvalConfig)
    base_cfg = load_config(configs / "demo" / "base.yaml", [f"output_dir={out / 'base'}"])
    method_cfgs = {  # validated up front: a bad config fails before minutes of training
        m: load_config(
            configs / "demo" / METHODS[m],
            [f"output_dir={out / m}", f"model.path={out / 'base' / 'model'}", f"rollout.backend={backend}"],
        )
        for m in methods
    }
    template = base_cfg.prompt.template
    timings: dict[str, float] = {}

    def timed(name, fn, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        timings[name] = round(time.perf_counter() - start, 1)
        print(f"[demo] {name}: {timings[name]:.1f} s")
        return result

    base_dir = timed("train base (sft)", ensure_base_model, base_cfg)
    both_modes = any(m in BOTH_MODES for m in methods)
    loaded: dict[Path, tuple] = {}  # each model and tokenizer read once, for all of its rows

    def evaluate_model(name: str, model_dir: Path, **kwargs) -> None:
        """The row `name` (thinking mode), and with both_modes the row "name (thinking-free)" after it."""
        if model_dir not in loaded:
            loaded[model_dir] = load(model_dir)
        rows[name] = timed(
            f"eval {name}",
            evaluate_row,
            model_dir,
            loaded[model_dir],
            eval_cfg,
            out / "eval" / name,
            template=template,
            **kwargs,
        )
        if both_modes and (name == "base" or name in BOTH_MODES):
            rows[f"{name} (thinking-free)"] = timed(
                f"eval {name} (thinking-free)",
                evaluate_row,
                model_dir,
                loaded[model_dir],
                eval_cfg,
                out / "eval" / f"{name}_thinking_free",
                template=template,
                thinking_free=True,
                **kwargs,
            )

    rows: dict[str, dict] = {}
    evaluate_model("base", base_dir, instruction=None, backend=backend)
    for preset in PROMPT_ONLY:
        evaluate_model(f"prompt_only_{preset}", base_dir, instruction=resolve_instruction(preset), backend=backend)
    for method, cfg in method_cfgs.items():
        model_dir = timed(f"train {method}", train, cfg)
        evaluate_model(method, model_dir, instruction=None, backend=backend)

    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    (out / "timings.json").write_text(json.dumps(timings, indent=2))
    notes = f"## Time per stage (s), rollouts and evaluations on {backend}\n\n"
    notes += "\n".join(f"- {k}: {v}" for k, v in timings.items())
    notes += "\n\n`prompt_only_v1` and `prompt_only_v2` are the base model with that instruction in its prompt."
    if both_modes:
        notes += (
            "\n\nRows marked (thinking-free) are evaluated on thinking-free prompts (an empty closed "
            "`<think>` block after the generation prompt); every other row in thinking mode."
        )
    report = write_report(out, rows, baseline="base", title="crisp demo: synthetic reasoning task", notes=notes)
    print()
    print(format_table(rows, baseline="base"))
    print(f"\nreport: {report}")
    return rows
