"""Data parallelism on accelerate, and the mixed-precision switch.

`accelerate launch -m crisp train CONFIG` starts one process per device; run without the launcher,
the same code is one process on one device. Every rank walks the same data order and draws the same
global batch of B prompts; then

  generate, grade  rank r takes the contiguous slice [B*r/W, B*(r+1)/W) of the prompts. Sampling
                   is seeded per prompt index (crisp.rollout), so the ranks together sample what
                   one process sampling all B prompts would.
  gather           rollouts and grades are all-gathered: every rank holds the whole batch and
                   computes the rollout filter, rewards, advantages, token counts and rollout
                   metrics identically, with no further communication.
  train            the rollouts that train are split into contiguous slices again. Each rank's loss
                   is its sum over its own tokens divided by the global normaliser (the response
                   tokens of the whole batch for self-distillation, DAPO's constant or batch token
                   count for GRPO), times W because DDP averages gradients over ranks: the averaged
                   gradient is then exactly the gradient one process computes over the whole batch.
  micro-batches    every rank runs the same number (DDP's and FSDP's collectives need it); a rank
                   whose slice has run out runs a placeholder micro-batch with weight 0.
  logs, files      the loss and loss statistics are summed over ranks; rank 0 writes metrics,
                   samples, checkpoints and the final model.
  checkpoints      hold every rank's RNG state besides rank 0's files; on resume every rank loads
                   the same checkpoint and takes back its own RNG state.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Callable, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object

from crisp import checkpoint
from crisp.config import ConfigError
from crisp.modeling import is_peft, save_model, unwrap
from crisp.tracking import require_installed, tracker_dir

DDP_TYPES = (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)


def make_accelerator(mixed_precision: str = "no", report_to: Sequence[str] = (), run_dir=None) -> Accelerator:
    """The process's Accelerator. Precision is crisp's own switch (`mixed_precision`, applied by
    `autocast`); a launcher asking for another one is an error rather than a silent override.
    `report_to` names experiment trackers (crisp.tracking), which must be installed, with their files
    in run_dir/trackers; they are started by crisp.tracking.start_trackers."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher != "no" and launcher != mixed_precision:
        raise ConfigError(
            f"mixed_precision: the config says {mixed_precision!r} but accelerate launch asks for "
            f"{launcher!r}; set mixed_precision={launcher} in the crisp config or change the launcher's"
        )
    require_installed(report_to)
    trackers = dict(log_with=list(report_to), project_dir=tracker_dir(run_dir)) if report_to else {}
    # Without a GPU, accelerate runs several launched processes as one group only when told cpu=True
    # (gloo); with one, it picks the GPU of each rank.
    return Accelerator(cpu=not torch.cuda.is_available(), **trackers)


def autocast(mixed_precision: str, device: torch.device):
    """bf16 autocast for forward passes when asked for (backward runs outside it)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16")


def shard(count: int, accelerator: Accelerator | None) -> range:
    """This rank's contiguous share of `count` items; shares differ in size by at most one.
    (Here and below, no accelerator means one process.)"""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    return range(count * rank // world, count * (rank + 1) // world)


def gather(items: list, accelerator: Accelerator | None) -> list:
    """Every rank's list, concatenated in rank order, on every rank (picklable items)."""
    if accelerator is None or accelerator.num_processes == 1:
        return list(items)
    return gather_object(list(items))


def reduce_sum(values: dict[str, float], accelerator: Accelerator | None) -> dict[str, float]:
    """The sum over ranks of each value (every rank passes the same keys)."""
    if accelerator is None or accelerator.num_processes == 1:
        return dict(values)
    summed = accelerator.reduce(
        torch.tensor(list(values.values()), dtype=torch.float64, device=accelerator.device), reduction="sum"
    )
    return dict(zip(values, summed.tolist()))


def micro_batches(
    count: int, size: int, accelerator: Accelerator | None, length: Callable[[int], int] | None = None
) -> list[tuple[list[int], bool]]:
    """This rank's share of `count` training items as micro-batches of at most `size` indices.

    Every rank gets the same number of micro-batches; past the end of its share a rank gets
    ([0], False): a placeholder to run with weight 0 (count must be > 0). With `length` (item index
    -> its length) a share cut into several micro-batches is first sorted by length, so that each
    micro-batch pads to a length close to its own; the number of micro-batches does not change."""
    mine = list(shard(count, accelerator))
    if length is not None and len(mine) > size:
        mine.sort(key=length)
    largest_share = -(-count // (accelerator.num_processes if accelerator is not None else 1))
    return [(mine[i : i + size], True) if mine[i : i + size] else ([0], False) for i in range(0, largest_share, size)]


def grad_sync(accelerator: Accelerator | None, model: torch.nn.Module, last: bool):
    """Under DDP, skip the gradient all-reduce on all but the last micro-batch of a step."""
    if last or accelerator is None or accelerator.distributed_type not in DDP_TYPES:
        return contextlib.nullcontext()
    return accelerator.no_sync(model)


def prepare(accelerator: Accelerator, model: torch.nn.Module, optimizer, *, checkpoints: bool = False):
    """Move the model to this rank's device and wrap it (and the optimizer) for DDP or FSDP.
    `checkpoints`: the run saves or resumes checkpoints, which crisp does not write under FSDP yet."""
    if accelerator.distributed_type == DistributedType.FSDP:
        if is_peft(model):
            raise ConfigError("model.lora: LoRA runs data-parallel with DDP (configs/accelerate/ddp.yaml), not FSDP")
        if checkpoints:
            raise ConfigError(
                "save_every, resume: checkpoints are not written under FSDP yet; set save_every=0 "
                "resume=none (the final model is saved), or use DDP"
            )
    return accelerator.prepare(model, optimizer)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() with FSDP2's sharded tensors gathered whole (a collective under FSDP)."""
    from torch.distributed.tensor import DTensor

    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}


def save_final(accelerator: Accelerator, model: torch.nn.Module, tokenizer, directory) -> None:
    """Rank 0 saves the trained model (modeling.save_model); under FSDP the shards are gathered first."""
    state_dict = accelerator.get_state_dict(model) if accelerator.distributed_type == DistributedType.FSDP else None
    if accelerator.is_main_process:
        save_model(unwrap(model), tokenizer, directory, state_dict=state_dict)
    accelerator.wait_for_everyone()


def save_checkpoint(accelerator: Accelerator, directory, step: int, *, models: dict, state: dict, keep: int) -> None:
    """checkpoint.save by rank 0, with every rank's RNG state (the ranks' draws differ where their
    shares do, e.g. dropout); returns on every rank once the checkpoint is complete on disk.

    The gather is a collective, so rank 0 cannot delete a checkpoint (keep-last-K) before every rank
    has finished reading the one it resumed from."""
    rng_by_rank = gather([checkpoint.rng_state()], accelerator)
    if accelerator.is_main_process:
        checkpoint.save(directory, step, models=models, state={**state, "rng_by_rank": rng_by_rank}, keep=keep)
    accelerator.wait_for_everyone()


def load_rng(accelerator: Accelerator, state: dict) -> None:
    """This rank's RNG state from a checkpoint's state (rank 0's if another number of ranks saved it)."""
    by_rank = state.get("rng_by_rank", [])
    own = by_rank[accelerator.process_index] if len(by_rank) == accelerator.num_processes else state["rng"]
    checkpoint.set_rng_state(own)


def end_processes() -> None:
    """End this process's part in a launched run: call it once, after the last collective, on every rank.

    Gloo runs collectives on worker threads that live as long as the process group object, and a
    worker lets go of a finished collective (and of the tensors it used, which Python owns) only
    after `wait()` has returned. If that falls into interpreter shutdown, its request for the GIL
    ends the thread by unwinding and the process aborts ("terminate called without an active
    exception", SIGABRT). destroy_process_group alone does not stop the workers while the DDP
    wrapper and the accelerator, possibly in a reference cycle, still hold the group; collecting
    them joins the workers while Python still runs. (torch's fully_shard keeps a reference of its
    own: see tests/fsdp_driver.py.)
    """
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        if "vllm.distributed.parallel_state" in sys.modules:  # a vLLM engine's groups hold gloo workers too
            from crisp.rollout_vllm import reset_stale_engine_groups

            reset_stale_engine_groups()
        gc.collect()
