"""metrics.jsonl (and rollouts.jsonl): one JSON object per record, with its step; metric keys are
namespaced (train/, rollout/, eval/, time/). `eval_metrics` turns an evaluation summary into eval/ keys."""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from crisp.tracking import rewind_trackers

if TYPE_CHECKING:
    from accelerate import Accelerator


class MetricsLog:
    """A JSONL log. Given an accelerator, every record also goes to its experiment trackers
    (crisp.tracking), at the record's step."""

    def __init__(self, path: str | Path, accelerator: Accelerator | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.accelerator = accelerator

    def truncate_after(self, step: int) -> None:
        """Drop records past `step`: a resumed run rewrites them, a fresh run (step 0) starts empty.
        The trackers are told too (crisp.tracking.rewind_trackers).

        A line that is not JSON can only be the last one, cut by a crash in the middle of a write;
        it is dropped too.
        """
        if self.accelerator is not None:
            rewind_trackers(self.accelerator, step)
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record["step"] <= step:
                keep.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)  # a crash here leaves the old file or the new one, never half of one

    def write(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.log(_scalars(metrics), step=step)


def eval_metrics(summary: dict, prefix: str = "eval/") -> dict:
    """A summary's figures as flat metrics (what metrics.jsonl and the trackers get): accuracy, tokens,
    truncation, the reasoning anatomy with each marker's rate, accuracy and tokens per level."""
    metrics = {
        f"{prefix}{key}": summary[key]
        for key in (
            "accuracy",
            "mean_tokens",
            "truncation_rate",
            "mean_thinking_tokens",
            "mean_answer_tokens",
            "loop_rate",
            "markers_per_1k_tokens",
        )
        if key in summary
    }
    for marker, rate in summary.get("marker_rates_per_1k_tokens", {}).items():
        metrics[f"{prefix}markers_per_1k_tokens/{marker.replace(' ', '_')}"] = rate
    for level, figures in summary["by_difficulty"].items():
        metrics[f"{prefix}L{level}_accuracy"] = figures["accuracy"]
        metrics[f"{prefix}L{level}_mean_tokens"] = figures["mean_tokens"]
    return metrics


def _scalars(metrics: dict) -> dict[str, float | int]:
    """The numbers of a record, as trackers take them (a bool as 0/1; NaN stays NaN)."""
    return {k: int(v) if isinstance(v, bool) else v for k, v in metrics.items() if isinstance(v, (int, float))}


def _plain(value):
    """Floats rounded; NaN/inf become null so that the file stays strict JSON."""
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    return value


class Timer:
    """Accumulates wall time per named phase: `with timer("generate"): ...` -> time/generate."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.totals[phase] = self.totals.get(phase, 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        out = {f"time/{k}": v for k, v in self.totals.items()}
        self.totals = {}
        return out
