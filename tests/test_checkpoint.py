"""Checkpoints: what a save holds, keep-last-K, a save that fails midway, truncated or corrupt files
skipped with a warning, and the pieces of loop state a resume depends on (RNG, data position, logs)."""

from __future__ import annotations

import json
import os
import random
import warnings

import numpy as np
import pytest
import torch

from crisp import checkpoint
from crisp.config import ConfigError
from crisp.data import synthetic
from crisp.driver import problem_stream
from crisp.metrics import MetricsLog
from crisp.modeling import load_model


def save(directory, step, model, tokenizer, keep=2, **state):
    return checkpoint.save(
        directory,
        step,
        models={"model": (model, tokenizer), "teacher": (model, None)},
        state={"value": torch.tensor([float(step)]), **state},
        keep=keep,
    )


def steps(directory) -> list[int]:
    return [int(p.name.split("-")[1]) for p in checkpoint.complete_checkpoints(directory)]


def test_a_checkpoint_holds_weights_state_and_rng(tiny_model, loaded_tokenizer, tmp_path):
    with torch.no_grad():
        next(tiny_model.parameters()).add_(1.0)  # not the saved base model's weights
    path = save(tmp_path, 3, tiny_model, loaded_tokenizer, note="x")
    draws = (random.random(), np.random.rand(), torch.rand(3))

    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # move every generator elsewhere
    state = checkpoint.load_state(checkpoint.latest(tmp_path))
    assert (state["step"], state["note"], state["value"].item()) == (3, "x", 3.0)
    checkpoint.set_rng_state(state["rng"])
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert draws[:2] == again[:2] and torch.equal(draws[2], again[2])

    for name in ("model", "teacher"):
        loaded = load_model(str(path / name)).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in tiny_model.state_dict().items())
    assert (path / "model" / "tokenizer.json").is_file() and not (path / "teacher" / "tokenizer.json").exists()
    assert not list(path.rglob("*.bin"))  # weights are safetensors only


def test_only_the_last_k_are_kept(tiny_model, loaded_tokenizer, tmp_path):
    for step in range(1, 5):
        save(tmp_path, step, tiny_model, loaded_tokenizer, keep=2)
    assert steps(tmp_path) == [3, 4]
    assert checkpoint.latest(tmp_path).name == "step-00000004"


@pytest.mark.parametrize("stage", ["weights", "state", "fsync"])
def test_an_exception_midway_through_a_save_leaves_the_previous_checkpoint(
    stage, tiny_model, loaded_tokenizer, tmp_path, monkeypatch
):
    save(tmp_path, 1, tiny_model, loaded_tokenizer)
    if stage == "weights":  # a half-written weights file, then the error
        real = type(tiny_model).save_pretrained

        def failing(self, directory, **kwargs):
            real(self, directory, **kwargs)
            path = os.path.join(directory, "model.safetensors")
            with open(path, "r+b") as f:
                f.truncate(100)
            raise OSError("No space left on device")

        monkeypatch.setattr(type(tiny_model), "save_pretrained", failing)
    elif stage == "state":

        def failing(obj, path):
            with open(path, "wb") as f:
                f.write(b"\x80\x02")
            raise OSError("No space left on device")

        monkeypatch.setattr(torch, "save", failing)
    else:

        def failing(fd):
            raise OSError("Input/output error")

        monkeypatch.setattr(os, "fsync", failing)

    with pytest.raises(OSError):
        save(tmp_path, 2, tiny_model, loaded_tokenizer)
    monkeypatch.undo()
    assert steps(tmp_path) == [1]
    assert not list(tmp_path.glob(".tmp-*"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the previous checkpoint verifies without a warning
        assert checkpoint.latest(tmp_path).name == "step-00000001"
    assert checkpoint.load_state(checkpoint.latest(tmp_path))["value"].item() == 1.0


def _truncate(path, keep_fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


def _scramble(path):
    data = bytearray(path.read_bytes())
    data[: len(data) // 2] = bytes(len(data) // 2)  # same size, garbage content
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        ("state.pt", _truncate),
        ("state.pt", _scramble),
        ("model/model.safetensors", _truncate),
        ("teacher/model.safetensors", _truncate),
        ("model/config.json", os.remove),
        ("COMPLETE", _truncate),
    ],
    ids=[
        "state-truncated",
        "state-garbage",
        "weights-truncated",
        "teacher-truncated",
        "config-missing",
        "marker-truncated",
    ],
)
def test_a_damaged_checkpoint_is_skipped_with_a_warning(damage, tiny_model, loaded_tokenizer, tmp_path):
    name, spoil = damage
    directory = tmp_path / "checkpoints"
    for step in (1, 2):
        save(directory, step, tiny_model, loaded_tokenizer)
    newest = directory / "step-00000002"
    spoil(newest / name)
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint .*step-00000002"):
        assert checkpoint.latest(directory) == directory / "step-00000001"
    with pytest.warns(UserWarning, match="skipping"):
        assert checkpoint.resolve_resume("auto", tmp_path) == directory / "step-00000001"
    with pytest.raises(FileNotFoundError, match="broken checkpoint"):
        checkpoint.resolve_resume(str(newest), tmp_path)
    # a resumed run that saves this step again replaces the damaged one
    save(directory, 2, tiny_model, loaded_tokenizer)
    checkpoint.verify(newest)


def test_resume_auto_reads_output_dir_checkpoints(tiny_model, loaded_tokenizer, tmp_path):
    assert checkpoint.resolve_resume("auto", tmp_path) is None
    assert checkpoint.resolve_resume("none", tmp_path) is None
    save(tmp_path / "checkpoints", 5, tiny_model, loaded_tokenizer)
    assert checkpoint.resolve_resume("auto", tmp_path) == tmp_path / "checkpoints" / "step-00000005"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpoint.resolve_resume(str(tmp_path / "nowhere"), tmp_path)


def test_a_killed_save_is_ignored_and_cleaned_up(tiny_model, loaded_tokenizer, tmp_path):
    save(tmp_path, 1, tiny_model, loaded_tokenizer)
    leftover = tmp_path / ".tmp-step-00000002"  # what a kill -9 in the middle of save(2) leaves
    (leftover / "model").mkdir(parents=True)
    (leftover / "model" / "model.safetensors").write_bytes(b"\0" * 10)
    assert checkpoint.latest(tmp_path).name == "step-00000001"
    save(tmp_path, 2, tiny_model, loaded_tokenizer)
    assert steps(tmp_path) == [1, 2] and not leftover.exists()


# ---------------------------------------------------------------------------------------------
# the loop state around a checkpoint
# ---------------------------------------------------------------------------------------------


def test_truncating_a_log_drops_later_records_and_a_torn_last_line(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3):
        log.write(step, {"train/loss": step / 10})
    with log.path.open("a") as f:
        f.write('{"step": 4, "train/lo')  # a kill in the middle of a write
    log.truncate_after(2)
    assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [1, 2]
    log.write(3, {"train/loss": 0.5})
    assert json.loads(log.path.read_text().splitlines()[-1]) == {"step": 3, "train/loss": 0.5}
    log.truncate_after(0)
    assert log.path.read_text() == ""
    assert not list(tmp_path.glob("*.tmp"))


def test_a_problem_stream_resumes_where_it_stopped_across_epochs():
    problems = synthetic.train_problems(0, 7, (1, 2))
    stream = problem_stream(problems, seed=3)
    stream.take(5)
    state = stream.state_dict()
    expected = [p.id for p in stream.take(12)]  # crosses two epoch boundaries
    resumed = problem_stream(problems, seed=3)
    resumed.load_state_dict(state)
    assert [p.id for p in resumed.take(12)] == expected
    # every epoch is a permutation, and consecutive epochs are shuffled differently
    fresh = problem_stream(problems, seed=3)
    first, second = [p.id for p in fresh.take(7)], [p.id for p in fresh.take(7)]
    assert sorted(first) == sorted(second) == sorted(p.id for p in problems) and first != second


def test_a_fresh_run_refuses_an_output_dir_that_holds_checkpoints(tiny_model, loaded_tokenizer, tmp_path):
    """Relaunching without resume=auto after a crash would wipe the run's logs and checkpoints."""
    save(tmp_path / "checkpoints", 7, tiny_model, loaded_tokenizer)
    with pytest.raises(ConfigError, match=r"^resume: .*step-00000007.*resume=auto"):
        checkpoint.resolve_resume("none", tmp_path)
    assert checkpoint.resolve_resume("auto", tmp_path).name == "step-00000007"


def test_saving_after_resuming_from_an_older_checkpoint_replaces_the_later_ones(tiny_model, loaded_tokenizer, tmp_path):
    """Checkpoints past the one a run resumed from belong to the timeline it replaces; left in place,
    keep-last-K would delete the new ones first and a later resume=auto would jump back to them."""
    for step in (1, 2, 3, 4):
        save(tmp_path, step, tiny_model, loaded_tokenizer, keep=10)
    (tmp_path / "step-00000001" / checkpoint.MARKER).unlink()  # as a deletion killed midway leaves it
    save(tmp_path, 2, tiny_model, loaded_tokenizer, keep=2, note="new")
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["step-00000002"]
    assert checkpoint.load_state(checkpoint.latest(tmp_path))["note"] == "new"
