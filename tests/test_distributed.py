"""Data parallelism: the sharding helpers, 2 processes on CPU (gloo) against 1 process, a 2-process
run resumed from a checkpoint against an uninterrupted one, and crisp on an FSDP2-sharded student.

The 2-process run goes through `accelerate launch` and crisp's CLI (tests/distributed_driver.py).
Stated tolerance: after training, both ranks hold bitwise identical weights, and those equal the
weights of a 1-process run with the same global batch to rtol 1e-4 / atol 1e-5 (the only
differences are summation orders: a gradient all-reduced from two halves, Adam dividing by tiny
second moments); logged metrics agree to 1e-4 relative, rollouts and evaluation samples exactly.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import TINY
from distributed_driver import run_command
from test_resume import assert_bitwise_equal, read_jsonl, weights, without_times

import crisp
from crisp import checkpoint, cli
from crisp.config import ConfigError, LoraSpec
from crisp.distributed import DistributedType, make_accelerator, micro_batches, prepare, reduce_sum, shard
from crisp.modeling import prepare_for_training

HERE = Path(__file__).parent


def ranks(world: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(process_index=r, num_processes=world) for r in range(world)]


@pytest.mark.parametrize("count, world", [(8, 2), (7, 2), (3, 4), (1, 2), (10, 3)])
def test_shards_are_contiguous_balanced_and_cover_everything(count, world):
    parts = [shard(count, rank) for rank in ranks(world)]
    assert [i for part in parts for i in part] == list(range(count))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("count, size, world", [(7, 2, 2), (3, 1, 2), (1, 4, 2), (9, 4, 3), (8, 3, 1)])
def test_every_rank_gets_the_same_number_of_micro_batches(count, size, world):
    per_rank = [micro_batches(count, size, rank) for rank in ranks(world)]
    assert len({len(m) for m in per_rank}) == 1  # the collectives line up
    real = [i for micro in per_rank for indices, is_real in micro if is_real for i in indices]
    assert real == list(range(count))  # each item trains once, in order
    for micro in per_rank:
        assert all(len(indices) <= size for indices, _ in micro)
        assert all(indices == [0] for indices, is_real in micro if not is_real)


@pytest.mark.parametrize("count, size, world", [(7, 2, 2), (9, 2, 3), (8, 3, 1), (3, 4, 2)])
def test_length_ordering_stays_within_each_share_and_keeps_the_micro_batch_count(count, size, world):
    """selfdistill.distill_backward sorts by length: each rank sorts its own share only (so the
    per-rank loss and the number of collectives are unchanged), and only when it is cut up."""
    lengths = [(5 * i) % 7 for i in range(count)]  # no order
    reordered = False
    for rank in ranks(world):
        plain = micro_batches(count, size, rank)
        by_length = micro_batches(count, size, rank, length=lengths.__getitem__)
        assert len(by_length) == len(plain)
        assert [real for _, real in by_length] == [real for _, real in plain]
        share = list(shard(count, rank))
        got = [i for indices, real in by_length if real for i in indices]
        assert sorted(got) == share
        expected = sorted(share, key=lengths.__getitem__) if len(share) > size else share
        assert got == expected
        reordered |= got != share
    assert reordered or count <= size * world  # the sort was exercised where shares are cut up


def test_fsdp_refuses_lora_and_checkpoints(tiny_model):
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP)
    with pytest.raises(ConfigError, match="save_every"):
        prepare(fsdp, tiny_model, None, checkpoints=True)
    with pytest.raises(ConfigError, match="model.lora"):
        prepare(fsdp, prepare_for_training(tiny_model, lora=LoraSpec(r=2)), None)


def test_a_launcher_asking_for_another_precision_is_an_error(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --config_file ddp.yaml` sets
    with pytest.raises(ConfigError, match="mixed_precision"):
        make_accelerator("no")


def test_the_program_ends_the_process_group_after_its_command(tmp_path, capsys):
    """`crisp` (cli.main) ends the process group once its command is done, after bad input too
    (every rank stops alike), and only then exits with the command's code."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(SystemExit) as info:
            cli.main(["eval", "--benchmark", "synthetic"])  # no --model, no --out: bad input
        assert not torch.distributed.is_initialized()  # the group was gone when the exit came
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert info.value.code == 2
    assert capsys.readouterr().err == "crisp: error: --model, --out: required without --config\n"


def test_reduce_sum_in_one_process_returns_the_values():
    one = SimpleNamespace(num_processes=1)
    assert reduce_sum({"loss": 1.5, "kl": 0.25}, one) == {"loss": 1.5, "kl": 0.25}


# ---------------------------------------------------------------------------------------------
# 2 processes (gloo) vs 1 process
# ---------------------------------------------------------------------------------------------


def configs(tmp_path: Path, model_dir: Path) -> dict[str, dict]:
    """One small run of each method, with batches that do not split evenly over 2 ranks."""
    base = {
        "seed": 0,
        "prompt": {"template": "plain"},
        "data": {"source": "synthetic", "size": 64},
        "optim": {"lr": 1e-2, "grad_clip": 1.0},
        "log_every": 1,
    }
    return {
        "selfdistill": {  # LoRA with a teacher adapter; 3 rollouts over 2 ranks: one rank runs a placeholder
            **base,
            "method": "selfdistill",
            "max_steps": 3,
            "batch_size": 3,
            "micro_batch_size": 1,
            "model": {"path": str(model_dir), "lora": {"r": 4, "alpha": 8}},
            "rollout": {"n": 1, "temperature": 1.0, "max_new_tokens": 10},
            "teacher": {"instruction": "v1", "update": "refresh", "refresh_every": 2},
            "loss": {"divergence": "reverse_kl", "chunk_size": 16},
            "eval": {"benchmark": "synthetic", "limit": 3, "k": 2, "sampling": {"max_new_tokens": 5}},
        },
        "grpo": {  # full fine-tuning, a KL term to a frozen copy, two passes per batch
            **base,
            "method": "grpo",
            "max_steps": 2,
            "batch_size": 3,
            "group_size": 4,
            "micro_batch_size": 3,
            "model": {"path": str(model_dir)},
            "rollout": {"temperature": 1.0},
            "schedule": {"kind": "constant", "l_min": 6, "l_max": 8, "period": 2},
            "chunk_size": 5,
            "kl_coef": 0.1,
            "ppo_epochs": 2,
            "loss_normaliser": "batch_tokens",
        },
        "sft": {
            **base,
            "method": "sft",
            "max_steps": 3,
            "seed": 1,
            "data": {"source": "synthetic", "size": 200},
            "model": {"tiny": TINY},
            "batch_tokens": 600,
            "optim": {"lr": 3e-3, "grad_clip": 1.0},
        },
        "eval": {
            "model": {"path": str(model_dir)},
            "benchmarks": ["synthetic"],
            "k": 2,
            "limit": 5,
            "sampling": {"temperature": 1.0, "max_new_tokens": 6},
            "prompt": {"template": "plain"},
        },
    }


def commands(tmp_path: Path, model_dir: Path, processes: int) -> list[list[str]]:
    out = []
    for name, data in configs(tmp_path, model_dir).items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        target = f"output_dir={tmp_path / f'{name}-{processes}'}"
        out.append(["eval", "--config", str(path), target] if name == "eval" else ["train", str(path), target])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    """CPU only, one thread, and the crisp this test imported (installed or from a source tree)."""
    return {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(
            [str(Path(crisp.__file__).parents[1]), str(HERE), os.environ.get("PYTHONPATH", "")]
        ),
    }


def launch_two_processes(folder: Path, command_lines: list[list[str]], *, check_threads: bool = True) -> None:
    env = subprocess_env()
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(HERE / "distributed_driver.py"),
        str(folder),
    ]
    done = subprocess.run(
        launch + [" ".join(c) for c in command_lines], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    if check_threads:
        assert_no_gloo_threads_left(folder)


def assert_no_gloo_threads_left(folder: Path) -> None:
    """After crisp.distributed.end_processes, gloo's worker threads are gone on every rank: none is left
    to let go of a collective's tensors while the interpreter shuts down (which aborts the process)."""
    for rank in (0, 1):
        names = json.loads((folder / f"threads-rank{rank}.json").read_text())
        if names is not None:  # (None: no /proc to list threads from)
            assert not [n for n in names if "gloo" in n], (rank, names)


def metrics(run: Path) -> list[dict]:
    """metrics.jsonl without the timings."""
    return without_times(read_jsonl(run / "metrics.jsonl"))


@pytest.mark.slow
def test_two_processes_match_one_process(tiny_model_dir, tmp_path):
    launch_two_processes(tmp_path, commands(tmp_path, tiny_model_dir, processes=2))
    for command in commands(tmp_path, tiny_model_dir, processes=1):
        run_command(command)

    initial = weights(tiny_model_dir)
    for method in ("selfdistill", "grpo", "sft"):
        two, one = tmp_path / f"{method}-2", tmp_path / f"{method}-1"
        rank0, rank1 = (torch.load(two / f"weights-rank{r}.pt") for r in (0, 1))
        assert rank0.keys() == rank1.keys()
        for name in rank0:
            assert torch.equal(rank0[name], rank1[name]), (method, name)  # the ranks never drifted apart
        w2, w1 = weights(two / "model"), weights(one / "model")
        for name in w1:  # atol: Adam turns summation-order noise in a near-zero gradient into a step
            torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=5e-5, msg=f"{method} {name}")
        if method != "sft":  # (sft builds its model from scratch)
            assert max((w1[k] - initial[k]).abs().max() for k in w1) > 1e-3  # training moved the weights
        m2, m1 = metrics(two), metrics(one)
        assert [m["step"] for m in m2] == [m["step"] for m in m1] == list(range(1, len(m1) + 1))  # rank 0 wrote once
        for row2, row1 in zip(m2, m1):
            assert row2 == pytest.approx(row1, rel=1e-4, abs=1e-6), method
    assert metrics(tmp_path / "selfdistill-2")[-1]["eval/accuracy"] is not None
    assert metrics(tmp_path / "grpo-2")[0]["train/updated_rollouts"] > 0

    samples = [(tmp_path / f"eval-{p}" / "synthetic" / "samples.jsonl").read_text() for p in (2, 1)]
    assert samples[0] == samples[1] and len(samples[0].splitlines()) == 10
    summaries = [json.loads((tmp_path / f"eval-{p}" / "synthetic" / "summary.json").read_text()) for p in (2, 1)]
    assert summaries[0] == summaries[1]


@pytest.mark.slow
def test_fsdp2_sharded_student_generates_and_trains_like_an_unsharded_one(tmp_path):
    """FSDP2 on CPU (torch's fully_shard; accelerate shards on GPUs only): see tests/fsdp_driver.py.
    Rank 0 makes one generate call and rank 1 two, and rollouts stop at different lengths, so this
    also shows that generation on a sharded model keeps the ranks' collectives in step (for both
    backends: the plain KV-cached loop runs every step to the limit on a sharded model)."""
    env = subprocess_env()
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(HERE / "fsdp_driver.py"),
        str(tmp_path),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    results = [json.loads((tmp_path / f"fsdp-rank{r}.json").read_text()) for r in (0, 1)]
    assert [len(r["lengths"]) for r in results] == [2, 4]  # 1 and 2 prompts, 2 samples each
    assert len({n for r in results for n in r["lengths"]}) > 1  # rollouts stopped at different lengths
    for r in results:
        assert r["rollouts_match"] and r["kv_rollouts_match"] and r["teacher_refreshed"]
        assert r["grad_diff"] <= 1e-5 * r["grad_scale"]
        assert r["norms"][0] == pytest.approx(r["norms"][1], rel=1e-5)


@pytest.mark.slow
def test_two_processes_resumed_from_a_checkpoint_equal_an_uninterrupted_run(tiny_model_dir, tmp_path):
    """Under DDP, rank 0 writes each checkpoint and every rank resumes from the same one: its LoRA
    adapters (the teacher's included) and its own RNG state (the ranks' sequences differ in length,
    so their LoRA dropout draws differ). A run resumed from step 1 of a 3-step run ends with bitwise
    the same weights on both ranks as that run, and logs steps 2 and 3 once, as that run did."""
    data = configs(tmp_path, tiny_model_dir)["selfdistill"]
    data = {
        **data,
        "model": {**data["model"], "lora": {"r": 4, "alpha": 8, "dropout": 0.2}},
        "eval": None,
        "save_every": 1,
        "keep_checkpoints": 3,
    }
    path = tmp_path / "selfdistill.yaml"
    path.write_text(yaml.safe_dump(data))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch_two_processes(
        tmp_path,
        [
            ["train", str(path), f"output_dir={straight}"],
            ["train", str(path), f"output_dir={resumed}", f"resume={straight / 'checkpoints' / 'step-00000001'}"],
        ],
    )

    assert [c.name for c in checkpoint.complete_checkpoints(resumed / "checkpoints")] == [
        "step-00000002",
        "step-00000003",
    ]
    assert metrics(resumed) == metrics(straight)[1:]  # steps 2 and 3, each written once
    for rank in (0, 1):
        assert_bitwise_equal(*(torch.load(run / f"weights-rank{rank}.pt") for run in (straight, resumed)))
    assert_bitwise_equal(weights(straight / "model"), weights(resumed / "model"))
