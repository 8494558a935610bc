"""Experiment trackers (`report_to`), through accelerate's tracker integration.

`report_to: [tensorboard, wandb, ...]` in a training config or `crisp eval`'s: rank 0 starts the
trackers with the resolved config as the run's hyperparameters (flattened to dotted keys, since
tensorboard's hparams take scalars only), and every record written to metrics.jsonl also goes to
them at its step (crisp.metrics.MetricsLog). metrics.jsonl is written either way.

Files live in the run directory: output_dir/trackers/ (tensorboard's event files in
trackers/crisp/, wandb's offline runs in trackers/wandb/, wandb's run id in trackers/wandb_run_id).
On resume:
  tensorboard  the same directory. Steps that ran after the checkpoint and before the crash are
               written again, after a "session start" event at the first of them (`rewind_trackers`):
               TensorBoard's Python event reader (EventAccumulator) then drops the earlier values of
               those steps, so a curve has no gap and one value per step. (A fresh run in a used
               directory rewinds to step 1.)
  wandb        the same run: its id is kept in the run directory and passed with resume="allow".
               wandb ignores a step it already has, so those steps keep the values first logged,
               which a crisp resume reproduces exactly (only time/ metrics differ).
  others       a new run each time, in the same project.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (imported by crisp.config, which must stay light)
    from accelerate import Accelerator
    from pydantic import BaseModel

# tracker name (accelerate's) -> the package to install for it
PIP_PACKAGES = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "trackio": "trackio",
    "comet_ml": "comet-ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
}
PROJECT = "crisp"


def require_installed(names) -> None:
    """A ConfigError naming the package of the first named tracker that cannot be imported."""
    from accelerate.utils import imports

    from crisp.config import ConfigError

    for name in names:
        if not getattr(imports, f"is_{name}_available")():
            raise ConfigError(f"report_to: {name} is not installed; pip install {PIP_PACKAGES[name]}")


def tracker_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "trackers"


def hyperparameters(config: dict, prefix: str = "") -> dict[str, str | int | float | bool]:
    """A nested config as flat dotted keys; lists and nulls as JSON text."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(hyperparameters(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return flat


def _wandb_run_id(directory: Path, resuming: bool) -> str:
    """The run id kept in the run directory: the same on resume, a new one for a fresh run."""
    path = directory / "wandb_run_id"
    if resuming and path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


def start_trackers(accelerator: Accelerator, config: BaseModel, run_dir: str | Path, *, resuming: bool) -> None:
    """Start the accelerator's trackers (rank 0; nothing without report_to) for the run in `run_dir`,
    with `config` (a pydantic config) as the hyperparameters."""
    if not accelerator.is_main_process or not config.report_to:
        return
    directory = tracker_dir(run_dir)
    init_kwargs = {}
    if "wandb" in config.report_to:
        init_kwargs["wandb"] = {
            "id": _wandb_run_id(directory, resuming),
            "resume": "allow",
            "name": Path(run_dir).resolve().name,
            "dir": str(directory),
        }
    accelerator.init_trackers(PROJECT, config=hyperparameters(config.model_dump(mode="json")), init_kwargs=init_kwargs)


def rewind_trackers(accelerator: Accelerator, step: int) -> None:
    """The steps after `step` are about to be logged again (a resumed run, or a fresh one at 0)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog

            start = Event(step=step + 1, wall_time=time.time(), session_log=SessionLog(status=SessionLog.START))
            tracker.writer._get_file_writer().add_event(start)  # torch's SummaryWriter: no public call for it
            tracker.writer.flush()


def finish_trackers(accelerator: Accelerator) -> None:
    """Close the trackers (accelerate's end_training would also end the process group, which crisp
    ends itself: crisp.distributed.end_processes)."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []
