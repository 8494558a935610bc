"""Benchmark evaluation: k samples per problem, graded; writes samples.jsonl and summary.json.

Accuracy is avg@k (the mean over all k samples of all problems) and pass@k (a problem counts when any
of its k samples is correct). Token counts are response tokens as generated, EOS included.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import Accelerator
from tqdm.auto import tqdm

from crisp.anatomy import THINK_CLOSE, THINK_OPEN, anatomy_figures, prompt_leaves_thinking_open, response_anatomy
from crisp.config import AnatomyConfig, EvalRunConfig, SamplingConfig
from crisp.data.problems import Problem
from crisp.data.tasks import Task, get_task
from crisp.distributed import autocast, gather, make_accelerator, shard
from crisp.grading import Grader, GradeResult, get_grader, grade
from crisp.metrics import MetricsLog, eval_metrics
from crisp.modeling import load_model, load_tokenizer
from crisp.prompts import PromptBuilder, resolve_instruction
from crisp.rollout import Generator, HFGenerator, Rollout
from crisp.rollout_vllm import build_generator
from crisp.tracking import finish_trackers, start_trackers


@dataclass
class GradedRollout:
    """One rollout, the problem it answers, its grade, and the figures the task and the reasoning
    anatomy add (evaluation only); `record()` is its row in samples.jsonl and rollouts.jsonl."""

    problem: Problem
    rollout: Rollout
    grade: GradeResult
    audit: dict = field(default_factory=dict)  # Task.audit's figures
    anatomy: dict = field(default_factory=dict)  # crisp.anatomy.response_anatomy's figures

    @property
    def correct(self) -> bool:
        return self.grade.correct

    def record(self) -> dict:
        return {
            "id": self.problem.id,
            "difficulty": self.problem.difficulty,
            "gold": self.problem.answer,
            "response": self.rollout.text,
            "tokens": self.rollout.num_tokens,
            "finish_reason": self.rollout.finish_reason,
            "correct": self.grade.correct,
            "extracted": self.grade.extracted,
            "timed_out": self.grade.timed_out,
            **self.audit,
            **self.anatomy,
        }


def score_rollouts(
    problems: Sequence[Problem], rollouts: Sequence[Rollout], grader: Grader | str, task: Task | None = None
) -> list[GradedRollout]:
    """Each rollout graded against its problem's answer (`grader`: one, or its name), with the
    task's audit when a task is given."""
    grader = get_grader(grader) if isinstance(grader, str) else grader
    graded = []
    for rollout in rollouts:
        problem = problems[rollout.prompt_index]
        audit = task.audit(problem, rollout.text) if task is not None else {}
        graded.append(GradedRollout(problem, rollout, grade(rollout.text, problem.answer, grader=grader), audit))
    return graded


def rollout_metrics(graded: Sequence[GradedRollout]) -> dict[str, float]:
    """The rollout/ figures every training method logs for the rollouts of a step."""
    return {
        "rollout/accuracy": sum(g.correct for g in graded) / len(graded),
        "rollout/mean_tokens": sum(g.rollout.num_tokens for g in graded) / len(graded),
        "rollout/truncation_rate": sum(g.rollout.finish_reason == "length" for g in graded) / len(graded),
    }


def summarize(records: Sequence[dict], task: Task | None = None) -> dict:
    """accuracy (avg@k), pass@k, mean tokens (all / correct only), truncation rate and the task's own
    figures (Task.audit_summary); also per level."""

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
            **anatomy_figures(rows),
            **(task.audit_summary(rows) if task is not None else {}),
        }

    summary = figures(records)
    levels = sorted({r["difficulty"] for r in records if r["difficulty"] is not None}, key=level_key)
    summary["by_difficulty"] = {level: figures([r for r in records if r["difficulty"] == level]) for level in levels}
    return summary


def add_anatomy(graded: Sequence[GradedRollout], tokenizer, anatomy: AnatomyConfig) -> None:
    """Each graded rollout gains its reasoning anatomy (crisp.anatomy.response_anatomy)."""

    def tag_ids(tag: str) -> tuple[int, ...]:  # () where the tokenizer does not know the tag
        ids = tuple(tokenizer.encode(tag, add_special_tokens=False))
        return () if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids else ids

    open_ids, close_ids = tag_ids(THINK_OPEN), tag_ids(THINK_CLOSE)
    prompt_open: dict[tuple[int, ...], bool] = {}  # the k samples of a problem share their prompt
    for g in graded:
        rollout = g.rollout
        if rollout.prompt_ids not in prompt_open:  # decoded with the tags even where they are special tokens
            prompt_open[rollout.prompt_ids] = prompt_leaves_thinking_open(tokenizer.decode(list(rollout.prompt_ids)))
        g.anatomy = dict(
            response_anatomy(
                rollout.token_ids,
                rollout.text,
                close_ids=close_ids,
                open_ids=open_ids,
                prompt_open=prompt_open[rollout.prompt_ids],
                markers=anatomy.markers,
                loop_ngram=anatomy.loop_ngram,
                loop_repeats=anatomy.loop_repeats,
                decode=lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True),
            )
        )


def _std_over_sample_index(rows: Sequence[dict]) -> float:
    """Spread of accuracy between the k sample sets (sample j of every problem): the run-to-run noise."""
    by_index: dict[int, list[bool]] = defaultdict(list)
    seen: dict[str, int] = defaultdict(int)
    for r in rows:
        by_index[seen[r["id"]]].append(r["correct"])
        seen[r["id"]] += 1
    accuracies = [statistics.fmean(v) for v in by_index.values()]
    return statistics.pstdev(accuracies) if len(accuracies) > 1 else 0.0


def level_key(level: str):
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
    task: Task,
    sampling: SamplingConfig,
    k: int = 1,
    seed: int = 0,
    instruction: str | None = None,
    grader: str | None = None,
    batch_size: int = 256,
    progress: bool = True,
    accelerator: Accelerator | None = None,
    anatomy: AnatomyConfig = AnatomyConfig(),
    generator: Generator | None = None,
) -> tuple[list[dict], dict]:
    """Sample k responses per problem (student prompt, or with `instruction` in front) and grade them
    with `grader` (default: the task's).

    With an `accelerator` of several processes, each samples and grades a slice of the problems and
    every process returns all the records (the same ones one process would produce). `generator`:
    the backend to sample with (e.g. a crisp.rollout_vllm.VLLMGenerator holding `model`'s weights);
    by default HF generate, `batch_size` sequences per call."""
    grader_name = grader or task.grader
    grader = get_grader(grader_name)
    mine = shard(len(problems), accelerator)  # this rank's problems
    if instruction:
        prompts = [builder.teacher_ids(problems[i], instruction=instruction) for i in mine]
    else:
        prompts = [builder.student_ids(problems[i]) for i in mine]
    sampling = sampling.model_copy(update={"n": k})
    bar = tqdm(total=len(mine) * k, desc="eval", disable=not progress, dynamic_ncols=True, leave=False)
    generator = generator or HFGenerator(model, tokenizer, batch_size=batch_size)
    rollouts = generator.generate(prompts, sampling, seed=seed, first_index=mine.start, progress=bar)
    bar.close()
    graded = score_rollouts(problems, rollouts, grader, task)
    add_anatomy(graded, tokenizer, anatomy)
    records = gather([g.record() for g in graded], accelerator)
    summary = summarize(records, task)
    summary.update(
        {
            "k": k,
            "seed": seed,
            "sampling": sampling.model_dump(),
            "grader": getattr(grader, "name", grader_name),
            "instruction": instruction,
            "prompt_template": builder.template,
            "thinking_mode": builder.thinking_mode,
            "anatomy": anatomy.model_dump(),
        }
    )
    return records, summary


def evaluate_benchmarks(
    cfg: EvalRunConfig, outputs: dict[str, Path], baselines: dict[tuple[str, str | None], dict | None]
) -> dict[tuple[str, str | None], dict]:
    """Evaluate cfg.model on each benchmark in each of cfg.modes (data-parallel under `accelerate
    launch`); rank 0 writes each one's samples.jsonl and summary.json to outputs[benchmark], or to
    its <mode> subfolder when modes are given, and its figures to output_dir/metrics.jsonl and the
    trackers (eval/<benchmark>/[<mode>/]..., step 0). Summaries and baselines are keyed by
    (benchmark, mode), the mode None when cfg.modes is empty."""
    accelerator = make_accelerator(cfg.mixed_precision, cfg.report_to, cfg.output_dir)
    tasks = {name: get_task(name) for name in cfg.benchmarks}
    problems = {name: task.eval_problems(cfg.limit) for name, task in tasks.items()}  # bad data fails first
    tokenizer = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    model = load_model(cfg.model.path, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
    model.to(accelerator.device)
    builders = {
        mode: PromptBuilder.from_config(
            tokenizer,
            cfg.prompt if mode is None else cfg.prompt.model_copy(update={"thinking_free": mode == "thinking_free"}),
        )
        for mode in cfg.modes or [None]
    }
    generator = build_generator(
        cfg.backend,
        cfg.vllm,
        model,
        tokenizer,
        batch_size=cfg.batch_size,
        trust_remote_code=cfg.model.trust_remote_code,
        max_new_tokens=cfg.sampling.max_new_tokens,
    )
    start_trackers(accelerator, cfg, cfg.output_dir, resuming=False)
    log = MetricsLog(Path(cfg.output_dir) / "metrics.jsonl", accelerator)
    if accelerator.is_main_process:
        log.truncate_after(-1)  # a new evaluation's figures, not appended to an earlier one's
    summaries = {}
    for name, benchmark in problems.items():
        for mode, builder in builders.items():
            with autocast(cfg.mixed_precision, accelerator.device):
                records, summary = evaluate(
                    model,
                    tokenizer,
                    benchmark,
                    builder=builder,
                    task=tasks[name],
                    sampling=cfg.sampling,
                    k=cfg.k,
                    seed=cfg.seed,
                    instruction=resolve_instruction(cfg.instruction),
                    grader=cfg.grader,
                    batch_size=cfg.batch_size,
                    progress=accelerator.is_main_process,
                    accelerator=accelerator,
                    anatomy=cfg.anatomy,
                    generator=generator,
                )
            summary.update({"model": cfg.model.path, "benchmark": name})
            if baselines.get((name, mode)) is not None:
                summary["vs_baseline"] = compare_to_baseline(summary, baselines[(name, mode)])
            if accelerator.is_main_process:
                write_results(result_dir(outputs[name], mode), records, summary)
                prefix = f"eval/{Path(name).stem}/" + (f"{mode}/" if mode else "")
                log.write(0, eval_metrics(summary, prefix=prefix))
            summaries[(name, mode)] = summary
    finish_trackers(accelerator)
    return summaries


def result_dir(folder: Path, mode: str | None) -> Path:
    """Where one benchmark's results in one prompt mode go: its folder, or the <mode> subfolder when
    several modes are evaluated (`EvalRunConfig.modes`)."""
    return folder / mode if mode else folder


def write_results(out_dir: str | Path, records: Sequence[dict], summary: dict) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "samples.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
