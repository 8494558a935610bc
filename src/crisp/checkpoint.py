"""Atomic checkpoints: written to a temporary directory, fsynced, then renamed into place.

A checkpoint directory `step-XXXXXXXX/` holds `model/` (save_pretrained, safetensors), optional
extra models (e.g. `teacher/`), `state.pt` (optimizer, LR schedule, RNG states, the method's state;
read with weights_only=True) and a `COMPLETE` marker written last: the size of every other file. `latest()`
returns the newest checkpoint whose files all have their recorded sizes and whose state loads; a
truncated or half-written one is skipped with a warning. An exception during `save` leaves the
earlier checkpoints as they were.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from crisp.config import ConfigError

MARKER = "COMPLETE"


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        # numpy's uint32 keys as int64: a uint32 tensor does not survive pickling (the ranks' gather)
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            _fsync_dir(path)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_sizes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def save(
    directory: str | Path,
    step: int,
    *,
    models: dict,  # name -> (model, tokenizer or None)
    state: dict,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep` ones."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:08d}"
    # left by a save that was killed, or by a deletion that was (every checkpoint has its marker)
    stale = [*directory.glob(".tmp-step-*"), *(p for p in directory.glob("step-*") if not (p / MARKER).exists())]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    tmp = directory / f".tmp-step-{step:08d}"
    tmp.mkdir()
    try:
        for name, (model, tokenizer) in models.items():
            model.save_pretrained(tmp / name, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / name)
        torch.save({"step": step, "rng": rng_state(), **state}, tmp / "state.pt")
        (tmp / MARKER).write_text(json.dumps({"step": step, "files": _file_sizes(tmp)}))
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # checkpoints of this step or later were written before a resume from an earlier one (a newer
    # one was broken, or an older one was named): that run's future, which this run replaces
    for later in [c for c in directory.glob("step-*") if _step(c) >= step]:
        shutil.rmtree(later)
    os.replace(tmp, final)
    _fsync_dir(directory)
    for old in complete_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


def complete_checkpoints(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob("step-*") if p.is_dir() and (p / MARKER).exists()]
    return sorted(found, key=_step)


def load_state(checkpoint: str | Path) -> dict:
    return torch.load(Path(checkpoint) / "state.pt", weights_only=True)


def verify(checkpoint: str | Path) -> dict:
    """The checkpoint's state; ValueError unless every file the marker lists has its recorded size
    and the state loads."""
    checkpoint = Path(checkpoint)
    try:
        files = json.loads((checkpoint / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"unreadable {MARKER} marker ({error})") from None
    for name, size in files.items():
        path = checkpoint / name
        if not path.is_file():
            raise ValueError(f"{name} is missing")
        if path.stat().st_size != size:
            raise ValueError(f"{name} has {path.stat().st_size} bytes, {size} were written")
    try:
        return load_state(checkpoint)
    except Exception as error:
        raise ValueError(f"state.pt does not load ({error})") from None


def _latest_with_state(directory: str | Path) -> tuple[Path, dict] | None:
    for checkpoint in reversed(complete_checkpoints(directory)):
        try:
            return checkpoint, verify(checkpoint)
        except ValueError as error:  # a truncated or corrupt file: fall back to the previous one
            warnings.warn(f"skipping unreadable checkpoint {checkpoint}: {error}", stacklevel=3)
    return None


def latest(directory: str | Path) -> Path | None:
    """The newest checkpoint that verifies; broken ones are skipped with a warning."""
    found = _latest_with_state(directory)
    return found[0] if found else None


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint resume_point names, or None."""
    point = resume_point(resume, output_dir)
    return point[0] if point else None


def resume_point(resume: str, output_dir: str | Path) -> tuple[Path, dict] | None:
    """The checkpoint to resume from and its state (read once, while verifying it): `none` -> None;
    `auto` -> the newest complete one under output_dir (or None); else the one at that path.

    `none` where output_dir already holds checkpoints is an error: a fresh run would wipe that
    run's logs and, as it saves, its checkpoints (relaunching after a crash without resume=auto).
    """
    if resume == "none":
        earlier = complete_checkpoints(Path(output_dir) / "checkpoints")
        if earlier:
            raise ConfigError(
                f"resume: none, but {output_dir} already holds checkpoints of a run (the newest is "
                f"{earlier[-1].name}); set resume=auto to continue it, or choose another output_dir"
            )
        return None
    if resume == "auto":
        return _latest_with_state(Path(output_dir) / "checkpoints")
    path = Path(resume)
    if not (path / MARKER).exists():
        raise FileNotFoundError(f"resume={resume}: not a complete checkpoint directory")
    try:
        return path, verify(path)
    except ValueError as error:
        raise FileNotFoundError(f"resume={resume}: broken checkpoint: {error}") from None
