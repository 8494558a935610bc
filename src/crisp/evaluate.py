"""Benchmark evaluation: k samples per problem, graded; writes samples.jsonl and summary.json.

Accuracy is avg@k (the mean over all k samples of all problems) and pass@k (a problem counts when any
of its k samples is correct). Token counts are response tokens as generated, EOS included.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from crisp.config import EvalRunConfig, SamplingConfig
from crisp.data import synthetic
from crisp.data.loaders import load_problems
from crisp.data.problems import Problem
from crisp.distributed import autocast, gather, make_accelerator, shard
from crisp.grading import get_grader, grade
from crisp.modeling import load_model, load_tokenizer
from crisp.prompts import PromptBuilder, resolve_instruction
from crisp.rollout import HFGenerator, Rollout


def default_grader(problems: Sequence[Problem]) -> str:
    return "exact" if problems and all(p.source == "synthetic" for p in problems) else "math-verify"


def score_rollouts(problems: Sequence[Problem], rollouts: Sequence[Rollout], grader_name: str) -> list[dict]:
    """One record per rollout: problem, response, tokens, finish reason, grade."""
    grader = get_grader(grader_name)
    records = []
    for rollout in rollouts:
        problem = problems[rollout.prompt_index]
        result = grade(rollout.text, problem.answer, grader=grader)
        records.append(
            {
                "id": problem.id,
                "difficulty": problem.difficulty,
                "gold": problem.answer,
                "response": rollout.text,
                "tokens": rollout.num_tokens,
                "finish_reason": rollout.finish_reason,
                "correct": result.correct,
                "extracted": result.extracted,
                "timed_out": result.timed_out,
            }
        )
        if problem.source == "synthetic":
            records[-1].update(synthetic.audit_steps(problem.question, rollout.text))
    return records


def summarize(records: Sequence[dict]) -> dict:
    """accuracy (avg@k), pass@k, mean tokens (all / correct only), truncation rate, on the synthetic task
    the step-line figures of `_step_figures`; also per level."""

    def figures(rows: Sequence[dict]) -> dict:
        by_problem: dict[str, list[bool]] = defaultdict(list)
        for r in rows:
            by_problem[r["id"]].append(r["correct"])
        correct_tokens = [r["tokens"] for r in rows if r["correct"]]
        return {
            "accuracy": statistics.fmean(r["correct"] for r in rows),
            "pass_at_k": statistics.fmean(any(v) for v in by_problem.values()),
            "mean_tokens": statistics.fmean(r["tokens"] for r in rows),
            "mean_tokens_correct": statistics.fmean(correct_tokens) if correct_tokens else None,
            "truncation_rate": statistics.fmean(r["finish_reason"] == "length" for r in rows),
            "accuracy_std_over_samples": _std_over_sample_index(rows),
            "num_problems": len(by_problem),
            "num_samples": len(rows),
            **_step_figures(rows),
        }

    summary = figures(records)
    levels = sorted({r["difficulty"] for r in records if r["difficulty"] is not None}, key=_level_key)
    summary["by_difficulty"] = {
        level: figures([r for r in records if r["difficulty"] == level]) for level in levels
    }
    return summary


def _step_figures(rows: Sequence[dict]) -> dict:
    """On the synthetic task: the share of step lines with the right operand and the right result."""
    steps = sum(r.get("steps", 0) for r in rows)
    if not steps:
        return {}
    return {"operand_accuracy": sum(r.get("operands_right", 0) for r in rows) / steps,
            "result_accuracy": sum(r.get("results_right", 0) for r in rows) / steps}


def _std_over_sample_index(rows: Sequence[dict]) -> float:
    """Spread of accuracy between the k sample sets (sample j of every problem): the run-to-run noise."""
    by_index: dict[int, list[bool]] = defaultdict(list)
    seen: dict[str, int] = defaultdict(int)
    for r in rows:
        by_index[seen[r["id"]]].append(r["correct"])
        seen[r["id"]] += 1
    accuracies = [statistics.fmean(v) for v in by_index.values()]
    return statistics.pstdev(accuracies) if len(accuracies) > 1 else 0.0


def _level_key(level: str):
    digits = "".join(c for c in str(level) if c.isdigit())
    return (int(digits) if digits else 0, str(level))


def compare_to_baseline(summary: dict, baseline: dict) -> dict:
    """Compression ratio CR = tokens / base tokens, and SIRI's dAcc/CR with dAcc = max(acc/acc_base - 1, 0)."""

    def ratios(current: dict, base: dict) -> dict:
        cr = current["mean_tokens"] / base["mean_tokens"] if base["mean_tokens"] else None
        dacc = max(current["accuracy"] / base["accuracy"] - 1, 0.0) if base["accuracy"] else None
        return {
            "compression_ratio": cr,
            "token_reduction": 1 - cr if cr is not None else None,
            "accuracy_delta": current["accuracy"] - base["accuracy"],
            "dacc": dacc,
            "dacc_over_cr": dacc / cr if cr and dacc is not None else None,
        }

    out = {"overall": ratios(summary, baseline), "by_difficulty": {}}
    for level, figures in summary.get("by_difficulty", {}).items():
        if level in baseline.get("by_difficulty", {}):
            out["by_difficulty"][level] = ratios(figures, baseline["by_difficulty"][level])
    return out


def evaluate(
    model,
    tokenizer,
    problems: Sequence[Problem],
    *,
    builder: PromptBuilder,
    sampling: SamplingConfig,
    k: int = 1,
    seed: int = 0,
    instruction: str | None = None,
    grader: str | None = None,
    batch_size: int = 256,
    progress: bool = True,
    accelerator=None,
    generator=None,
) -> tuple[list[dict], dict]:
    """Sample k responses per problem (student prompt, or with `instruction` in front) and grade them.

    With an `accelerator` of several processes, each samples and grades a slice of the problems and
    every process returns all the records (the same ones one process would produce). `generator`:
    the backend to sample with (e.g. a crisp.rollout_vllm.VLLMGenerator holding `model`'s weights);
    by default HF generate, `batch_size` sequences per call."""
    grader = grader or default_grader(problems)
    if instruction:
        prompts = [builder.teacher_ids(p, instruction=instruction) for p in problems]
    else:
        prompts = [builder.student_ids(p) for p in problems]
    sampling = sampling.model_copy(update={"n": k})
    mine = shard(len(prompts), accelerator)
    bar = tqdm(total=len(mine) * k, desc="eval", disable=not progress, dynamic_ncols=True, leave=False)
    generator = generator or HFGenerator(model, tokenizer, batch_size=batch_size)
    rollouts = generator.generate(
        [prompts[i] for i in mine], sampling, seed=seed, first_index=mine.start, progress=bar)
    bar.close()
    records = score_rollouts(problems, rollouts, grader)
    records = gather(records, accelerator)
    summary = summarize(records)
    grader_obj = get_grader(grader)
    summary.update(
        {
            "k": k,
            "seed": seed,
            "sampling": sampling.model_dump(),
            "grader": getattr(grader_obj, "name", grader),
            "instruction": instruction,
            "prompt_template": builder.template,
        }
    )
    return records, summary


def evaluate_benchmarks(cfg: EvalRunConfig, outputs: dict[str, Path], baselines: dict[str, dict | None]) -> dict:
    """Evaluate cfg.model on each benchmark (data-parallel under `accelerate launch`); rank 0 writes
    each one's samples.jsonl and summary.json to outputs[benchmark]. Returns the summaries."""
    accelerator = make_accelerator(cfg.mixed_precision)
    problems = {name: load_problems(name, limit=cfg.limit) for name in cfg.benchmarks}  # bad data fails first
    tokenizer = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    model = load_model(cfg.model.path, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
    model.to(accelerator.device)
    builder = PromptBuilder.from_config(tokenizer, cfg.prompt)
    generator = None  # HF generate
    if cfg.backend == "vllm":
        from crisp.rollout_vllm import VLLMGenerator

        generator = VLLMGenerator(model, tokenizer, cfg.vllm, trust_remote_code=cfg.model.trust_remote_code,
                                  max_new_tokens=cfg.sampling.max_new_tokens)
    summaries = {}
    for name, benchmark in problems.items():
        with autocast(cfg.mixed_precision, accelerator.device):
            records, summary = evaluate(model, tokenizer, benchmark, builder=builder, sampling=cfg.sampling, k=cfg.k,
                                        seed=cfg.seed, instruction=resolve_instruction(cfg.instruction),
                                        grader=cfg.grader, batch_size=cfg.batch_size,
                                        progress=accelerator.is_main_process, accelerator=accelerator,
                                        generator=generator)
        summary.update({"model": cfg.model.path, "benchmark": name})
        if baselines.get(name) is not None:
            summary["vs_baseline"] = compare_to_baseline(summary, baselines[name])
        if accelerator.is_main_process:
            write_results(outputs[name], records, summary)
        summaries[name] = summary
    return summaries


def write_results(out_dir: str | Path, records: Sequence[dict], summary: dict) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "samples.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


def format_table(rows: dict[str, dict], *, baseline: str | None = None) -> str:
    """A plain-text table: one row per named summary, accuracy and mean tokens per level."""
    levels = sorted({lv for s in rows.values() for lv in s.get("by_difficulty", {})}, key=_level_key)
    header = ["run", "acc", "tokens"] + [f"L{lv} acc/tok" for lv in levels] + (["reduction"] if baseline else [])
    lines = [header]
    for name, s in rows.items():
        cells = [name, f"{s['accuracy']:.3f}", f"{s['mean_tokens']:.1f}"]
        for lv in levels:
            d = s.get("by_difficulty", {}).get(lv)
            cells.append(f"{d['accuracy']:.2f}/{d['mean_tokens']:.0f}" if d else "-")
        if baseline:
            base = rows[baseline]["mean_tokens"]
            cells.append(f"{1 - s['mean_tokens'] / base:+.1%}" if name != baseline else "")
        lines.append(cells)
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in lines)
