"""Atomic checkpoints: written to a temporary directory, fsynced, then renamed into place.

A checkpoint directory `step-XXXXXXXX/` holds `model/` (save_pretrained), optional extra models
(e.g. `teacher/`), `state.pt` (optimizer, LR schedule, RNG states, loop state; read with
weights_only=True) and a `COMPLETE` marker written last. `latest()` returns the newest one with the
marker whose files all load; a half-written one is skipped with a warning.
"""

from __future__ import annotations

import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

MARKER = "COMPLETE"


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    tmp = directory / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, (model, tokenizer) in models.items():
        model.save_pretrained(tmp / name, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / name)
    torch.save({"step": step, "rng": rng_state(), **state}, tmp / "state.pt")
    (tmp / MARKER).write_text(str(step))
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in complete_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob("step-*") if p.is_dir() and (p / MARKER).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def load_state(checkpoint: str | Path) -> dict:
    return torch.load(Path(checkpoint) / "state.pt", weights_only=True)


def latest(directory: str | Path) -> Path | None:
    """The newest checkpoint whose state loads; broken ones are skipped with a warning."""
    for checkpoint in reversed(complete_checkpoints(directory)):
        try:
            load_state(checkpoint)
            return checkpoint
        except Exception as error:  # a truncated or corrupt file: fall back to the previous one
            warnings.warn(f"skipping unreadable checkpoint {checkpoint}: {error}")
    return None


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """`none` -> None; `auto` -> newest complete checkpoint under output_dir (or None); else a path."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest(Path(output_dir) / "checkpoints")
    path = Path(resume)
    if not (path / MARKER).exists():
        raise FileNotFoundError(f"resume={resume}: not a complete checkpoint directory")
    return path
