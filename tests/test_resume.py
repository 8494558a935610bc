"""Exact resume after a crash: `crisp train` killed with SIGKILL at a random moment, resumed with
resume=auto, ends with the same weights (bitwise) and the same metrics.jsonl as a run that was never
interrupted; extending a finished run redoes nothing; non-finite steps are skipped and, past
max_skipped_steps, stop the run with a message and a good last checkpoint."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY

import crisp
from crisp import checkpoint, cli
from crisp.config import ConfigError, validate
from crisp.data import synthetic
from crisp.driver import Training, TrainingStopped, train
from crisp.modeling import load_model, save_model
from crisp.prompts import PromptBuilder

SELFDISTILL = {
    "method": "selfdistill",
    "seed": 0,
    "threads": 1,
    "prompt": {"template": "plain"},
    "data": {"source": "synthetic", "size": 64},
    "batch_size": 4,
    "micro_batch_size": 2,
    "rollout": {"n": 1, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 16},
    # an EMA teacher drifts away from both the initial weights and the student: a resume that lost it shows
    "teacher": {"instruction": "v1", "update": "ema", "ema_decay": 0.5},
    "loss": {"divergence": "reverse_kl", "chunk_size": 16},
    "optim": {"lr": 1e-2, "grad_clip": 1.0, "schedule": "cosine", "warmup_steps": 2},
    "log_every": 1,
    "save_every": 1,
    "keep_checkpoints": 2,
}

GRPO = {
    "method": "grpo",
    "seed": 0,
    "threads": 1,
    "prompt": {"template": "plain"},
    "batch_size": 2,
    "group_size": 4,
    "micro_batch_size": 4,
    "rollout": {"temperature": 1.0, "top_p": 1.0, "top_k": 0},
    "schedule": {"kind": "stair", "l_min": 4, "l_max": 8, "period": 2},
    "chunk_size": 8,
    "kl_coef": 0.1,
    "dynamic_sampling": True,
    "max_sampling_rounds": 2,
    "optim": {"lr": 3e-3, "grad_clip": 1.0, "schedule": "cosine", "warmup_steps": 2},
    "log_every": 1,
    "save_every": 1,
    "keep_checkpoints": 2,
}

# SFT builds its model from scratch (model.tiny): no model directory
SFT = {
    "method": "sft",
    "seed": 0,
    "threads": 1,
    "model": {"tiny": {**TINY, "max_positions": 256}},
    "prompt": {"template": "plain"},
    "data": {"source": "synthetic", "size": 200},
    "batch_tokens": 600,
    "optim": {"lr": 3e-3, "grad_clip": 1.0, "schedule": "cosine", "warmup_steps": 2},
    "log_every": 1,
    "save_every": 1,
    "keep_checkpoints": 2,
}

STEPS = 10


def config(base: dict, model_dir: Path | None, out: Path, **overrides) -> dict:
    model = {"model": {"path": str(model_dir)}} if model_dir is not None else {}
    return {**base, **model, "output_dir": str(out), "max_steps": STEPS, **overrides}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_times(records: list[dict]) -> list[dict]:
    """The records without what depends on the clock: time/* and the throughput."""
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "train/tokens_per_s"} for r in records]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_model(str(directory)).state_dict()


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"not bitwise equal: {different}"


def run_killed(
    config_path: Path, out: Path, kill_after_lines: int, extra_delay: float, deadline_s: float = 120
) -> None:
    """`python -m crisp train` in a subprocess, SIGKILLed `extra_delay` s after metrics.jsonl holds
    `kill_after_lines` records: anywhere in a step, in a checkpoint save or in a log write."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    src = str(Path(crisp.__file__).resolve().parents[1])  # the crisp this test imported, installed or not
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    metrics = out / "metrics.jsonl"
    with open(out.parent / f"{out.name}.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "crisp", "train", str(config_path)], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + deadline_s
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                if metrics.exists() and metrics.read_bytes().count(b"\n") >= kill_after_lines:
                    time.sleep(extra_delay)
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.002)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, (
        f"the run was not killed mid-way (exit code {proc.returncode}):\n"
        + (out.parent / f"{out.name}.log").read_text()[-3000:]
    )
    assert not (out / "model").exists()


def kill_and_resume(
    base: dict, model_dir: Path, tmp_path: Path, *, break_newest: bool = False, deadline_s: float = 120
) -> None:
    straight = tmp_path / "straight"
    train(validate(config(base, model_dir, straight)))

    crashed = tmp_path / "crashed"
    crashed.mkdir()
    config_path = tmp_path / "crashed.yaml"
    config_path.write_text(yaml.safe_dump(config(base, model_dir, crashed, resume="auto")))
    rng = random.Random()
    # after step 3's record, checkpoints 1 and 2 are complete: the newest has one to fall back to
    kill_after, delay = rng.randint(3, STEPS - 4), rng.uniform(0.0, 0.05)
    run_killed(config_path, crashed, kill_after, delay, deadline_s)
    newest = checkpoint.latest(crashed / "checkpoints")
    assert newest is not None and checkpoint.load_state(newest)["step"] < STEPS

    if break_newest:  # a torn weights file: resume must fall back to the checkpoint before it
        weights_file = newest / "model" / "model.safetensors"
        weights_file.write_bytes(weights_file.read_bytes()[:1000])
        with pytest.warns(UserWarning, match="skipping unreadable checkpoint"):
            fallback = checkpoint.latest(crashed / "checkpoints")
        assert fallback is not None and fallback.name < newest.name

    with pytest.warns(UserWarning, match="skipping unreadable") if break_newest else contextlib.nullcontext():
        train(validate(config(base, model_dir, crashed, resume="auto")))

    context = f"killed {delay:.3f} s after step {kill_after}"
    assert_bitwise_equal(weights(crashed / "model"), weights(straight / "model"))
    resumed, uninterrupted = read_jsonl(crashed / "metrics.jsonl"), read_jsonl(straight / "metrics.jsonl")
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1)), context
    assert without_times(resumed) == without_times(uninterrupted), context
    samples = [
        read_jsonl(run / "rollouts.jsonl") if (run / "rollouts.jsonl").exists() else None for run in (crashed, straight)
    ]  # (SFT has no rollouts)
    assert samples[0] == samples[1], context
    assert [p.name for p in checkpoint.complete_checkpoints(crashed / "checkpoints")] == [
        f"step-{STEPS - 1:08d}",
        f"step-{STEPS:08d}",
    ]
    assert not list((crashed / "checkpoints").glob(".tmp-*"))


# ---------------------------------------------------------------------------------------------
# a policy with something to learn for GRPO: it answers "1" or "2", about half right
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def answering_model_and_data(tiny_model_dir, tiny_tokenizer, tmp_path_factory):
    """The tiny model, taught to reply "Answer: 1" or "Answer: 2" (a coin flip), and a problem file
    whose golds are 1 or 2: every GRPO group has mixed rewards, so every step updates the policy."""
    directory = tmp_path_factory.mktemp("answering")
    rng = random.Random(0)
    problems = synthetic.test_problems()[:32]
    rows = [
        {"id": f"p{i}", "question": p.question, "answer": str(rng.choice([1, 2])), "source": "synthetic"}
        for i, p in enumerate(problems)
    ]
    (directory / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    model = load_model(str(tiny_model_dir))
    builder = PromptBuilder(tiny_tokenizer, template="plain")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(40):
        sequences, labels = [], []
        for p in rng.sample(problems, 8):
            prompt = builder.student_ids(p)
            answer = tiny_tokenizer(f"Answer: {rng.choice([1, 2])}", add_special_tokens=False)["input_ids"]
            sequences.append(prompt + answer + [tiny_tokenizer.eos_token_id])
            labels.append([-100] * len(prompt) + answer + [tiny_tokenizer.eos_token_id])
        width = max(map(len, sequences))
        input_ids = torch.tensor([s + [tiny_tokenizer.pad_token_id] * (width - len(s)) for s in sequences])  # (B, T)
        attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])  # (B, T)
        label_ids = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])  # (B, T)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=label_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    save_model(model, tiny_tokenizer, directory / "model")
    return directory / "model", directory / "problems.jsonl"


# ---------------------------------------------------------------------------------------------
# kill -9, resume, compare
# ---------------------------------------------------------------------------------------------


def test_selfdistill_killed_and_resumed_equals_uninterrupted(tiny_model_dir, tmp_path):
    kill_and_resume(SELFDISTILL, tiny_model_dir, tmp_path)


def test_a_checkpoint_of_an_earlier_format_is_refused_before_anything_loads(tmp_path):
    """A checkpoint written before the one driver (no format entry in its state) is an error that
    names it, not a KeyError half-way through loading."""
    first = tmp_path / "first"
    train(validate(config(SFT, None, first, max_steps=1)))
    written = checkpoint.latest(first / "checkpoints")
    state = checkpoint.load_state(written)
    del state["format"], state["step"], state["rng"]
    old = checkpoint.save(
        tmp_path / "old" / "checkpoints", 1, models={"model": (load_model(str(written / "model")), None)}, state=state
    )
    with pytest.raises(ConfigError, match="format 1, written by an earlier crisp"):
        train(validate(config(SFT, None, tmp_path / "resumed", resume=str(old))))


def test_sft_killed_and_resumed_equals_uninterrupted(tmp_path):
    """SFT runs on the same driver: the same checkpoints, the same exact resume."""
    kill_and_resume(SFT, None, tmp_path)


def test_grpo_killed_and_resumed_from_an_older_checkpoint_equals_uninterrupted(answering_model_and_data, tmp_path):
    model_dir, problems = answering_model_and_data
    base = {**GRPO, "data": {"source": str(problems)}}
    kill_and_resume(base, model_dir, tmp_path, break_newest=True)
    metrics = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    assert all(m["train/updated_rollouts"] > 0 for m in metrics)  # every step changed the policy
    assert 0 < sum(m["rollout/accuracy"] for m in metrics) / len(metrics) < 1


def test_grpo_staged_killed_and_resumed_across_stage_boundaries_equals_uninterrupted(
    answering_model_and_data, tmp_path
):
    """TFPI's stages: thinking-free prompts with a cap growing every two steps, then a thinking-mode
    stage. Wherever the kill lands (after step 3-6), the resumed run crosses at least one stage
    boundary, and it must equal the run that was never interrupted, stage markers included."""
    model_dir, problems = answering_model_and_data
    stages = [
        {"max_length": 4, "steps": 2},
        {"max_length": 6, "steps": 2},
        {"max_length": 8, "steps": 2},
        {"max_length": 10, "steps": 2},
        {"max_length": 12, "steps": 2, "thinking_free": False},
    ]
    base = {
        **GRPO,
        "data": {"source": str(problems)},
        "prompt": {"template": "plain", "thinking_free": True},
        "schedule": {"kind": "stages", "stages": stages},
    }
    kill_and_resume(base, model_dir, tmp_path)
    metrics = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    assert [m["rollout/stage"] for m in metrics] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert [m["step"] for m in metrics if "train/stage_start" in m] == [1, 3, 5, 7, 9]
    assert [m["rollout/thinking_free"] for m in metrics] == [True] * 8 + [False] * 2


# ---------------------------------------------------------------------------------------------
# non-finite steps
# ---------------------------------------------------------------------------------------------


def poison_gradients(training: Training, steps: set[int]) -> None:
    """Make every gradient of the run's model infinite during the given (1-based) steps, through
    autograd's own hooks on the parameters."""
    for parameter in training.method.model.parameters():
        if parameter.requires_grad:
            parameter.register_hook(lambda grad: grad * math.inf if training.step + 1 in steps else grad)


@pytest.mark.parametrize("method", ["selfdistill", "grpo", "sft"])
def test_non_finite_steps_are_skipped_then_stop_the_run_keeping_a_good_checkpoint(
    method, tiny_model_dir, answering_model_and_data, tmp_path
):
    """Steps 3, 5 and 6 get an infinite gradient. Each is skipped and counted; with
    max_skipped_steps=2 the second consecutive one stops the run with a message, after logging it
    and before checkpointing it."""
    if method == "selfdistill":
        data = config(SELFDISTILL, tiny_model_dir, tmp_path / "run")
    elif method == "sft":
        data = config(SFT, None, tmp_path / "run")
    else:
        model_dir, problems = answering_model_and_data
        data = config({**GRPO, "data": {"source": str(problems)}}, model_dir, tmp_path / "run")
    training = Training(validate({**data, "max_skipped_steps": 2}))
    poison_gradients(training, {3, 5, 6})

    with pytest.raises(TrainingStopped) as info:
        training.run()
    message = str(info.value)
    assert "2 consecutive steps had a non-finite loss or gradient (step 6)" in message
    assert str(tmp_path / "run" / "checkpoints") in message

    out = tmp_path / "run"
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert [m["train/skipped_steps"] for m in metrics] == [0, 0, 1, 1, 2, 3]
    assert not (out / "model").exists()
    # checkpoint 6 was never written; checkpoint 5 holds exactly the weights of checkpoint 4
    four, five = checkpoint.complete_checkpoints(out / "checkpoints")
    assert (four.name, five.name) == ("step-00000004", "step-00000005")
    assert checkpoint.latest(out / "checkpoints") == five
    assert_bitwise_equal(weights(five / "model"), weights(four / "model"))
    assert all(torch.isfinite(w).all() for w in weights(five / "model").values())
    assert checkpoint.load_state(five)["consecutive_skips"] == 1


def test_a_diverging_run_stops_the_cli_with_exit_code_1(tiny_model_dir, tmp_path, capsys):
    """A learning rate that blows the weights up: the next steps' losses are not finite, and after
    max_skipped_steps of them `crisp train` stops with exit code 1 and says where the good
    checkpoint is."""
    path = tmp_path / "run.yaml"
    data = config(SELFDISTILL, tiny_model_dir, tmp_path / "run", max_skipped_steps=2)
    path.write_text(yaml.safe_dump({**data, "optim": {**data["optim"], "lr": 1e30, "grad_clip": None}}))
    with pytest.raises(SystemExit) as info:
        cli.main(["train", str(path)])
    assert info.value.code == 1
    message = capsys.readouterr().err
    assert "consecutive steps had a non-finite loss or gradient" in message
    assert str(tmp_path / "run" / "checkpoints") in message
