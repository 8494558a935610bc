"""Run by torch.distributed.run from test_distributed.py: crisp's pieces on an FSDP2-sharded student.

accelerate only shards models on GPUs, but FSDP2 itself runs on CPU with gloo; this script shards a
tiny student with torch's fully_shard (one unit per decoder layer and the root, as the FSDP config
asks) and checks, against an unsharded copy of the same weights:
  - generation: each rank samples a different slice; the rollouts are those of the unsharded model,
    from HF generate and from the plain KV-cached loop alike
  - the self-distillation loss: each rank's micro-batch, weighted by world size / global tokens,
    gives (after FSDP's gradient averaging) the gradient of the whole batch in one process
  - the gradient norm (clip_and_check) over the sharded gradients
  - a teacher copy refreshed from the sharded student holds the student's full weights
Writes fsdp-rank<r>.json into the folder given as the first argument.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import TINY, vocabulary
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from crisp.config import SamplingConfig
from crisp.methods.selfdistill import LossConfig, distill_loss_sum
from crisp.modeling import build_tiny_model, build_word_tokenizer
from crisp.optim import clip_and_check
from crisp.rollout import HFGenerator, KVCacheGenerator
from crisp.teacher import Teacher

WEIGHT_SCALE, EOS_SCALE = 4.0, 3.0


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tokenizer = build_word_tokenizer(vocabulary())
    student = build_tiny_model(tokenizer, seed=0, **{**TINY, "num_layers": 2})
    with torch.no_grad():  # larger weights and a likelier EOS: rollouts stop at different lengths
        for p in student.parameters():
            p.mul_(WEIGHT_SCALE)
        student.get_input_embeddings().weight[tokenizer.eos_token_id] *= EOS_SCALE
    unsharded = copy.deepcopy(student)
    teacher = Teacher(student, update="refresh", refresh_every=1)
    with torch.no_grad():  # a teacher that differs from the student, so the loss is not 0
        for p in teacher.model.parameters():
            p.mul_(0.9)
    mesh = init_device_mesh("cpu", (world,))
    for layer in student.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(student, mesh=mesh)

    # 3 prompts x 2 samples over 2 ranks, 3 sequences per generate call: rank 0 makes one call,
    # rank 1 two; without the extra call and synced stopping, the collectives would hang.
    prompts = [[5, 6, 7, 8, 9], [5, 6, 7], [9, 8, 7, 6]]
    sampling = SamplingConfig(n=2, temperature=1.0, max_new_tokens=12)
    share = slice(rank * len(prompts) // world, (rank + 1) * len(prompts) // world)
    sharded_rollouts = HFGenerator(student, tokenizer, batch_size=3).generate(
        prompts[share], sampling, seed=3, first_index=share.start
    )
    expected_rollouts = HFGenerator(unsharded, tokenizer).generate(prompts, sampling, seed=3)
    kv_rollouts = KVCacheGenerator(student, tokenizer, batch_size=3).generate(
        prompts[share], sampling, seed=3, first_index=share.start
    )

    responses = [list(r.token_ids) for r in expected_rollouts]
    rows = [r.prompt_index for r in expected_rollouts]
    loss_cfg = LossConfig(divergence="reverse_kl", chunk_size=5)
    pad, tokens = tokenizer.pad_token_id, sum(map(len, responses))
    mine = range(rank * len(rows) // world, (rank + 1) * len(rows) // world)
    loss = distill_loss_sum(
        student,
        teacher,
        [prompts[rows[i]] for i in mine],
        [prompts[rows[i]] for i in mine],
        [responses[i] for i in mine],
        loss_cfg,
        pad,
    )
    (loss * world / tokens).backward()
    full = distill_loss_sum(
        unsharded, teacher, [prompts[i] for i in rows], [prompts[i] for i in rows], responses, loss_cfg, pad
    )
    (full / tokens).backward()
    grads = {n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for n, p in student.named_parameters()}
    grad_diff = max((grads[n] - p.grad).abs().max().item() for n, p in unsharded.named_parameters())
    grad_scale = max(p.grad.abs().max().item() for p in unsharded.parameters())
    norms = [clip_and_check(student, None), clip_and_check(unsharded, None)]

    teacher.after_step(1, student)
    refreshed = all(
        torch.equal(t, u) for t, u in zip(teacher.model.state_dict().values(), unsharded.state_dict().values())
    )
    result = {
        "rollouts_match": sharded_rollouts == expected_rollouts[share.start * sampling.n : share.stop * sampling.n],
        "kv_rollouts_match": kv_rollouts == sharded_rollouts,
        "lengths": [r.num_tokens for r in sharded_rollouts],
        "grad_diff": grad_diff,
        "grad_scale": grad_scale,
        "norms": norms,
        "teacher_refreshed": refreshed,
    }
    (out / f"fsdp-rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    # fully_shard keeps a reference to the process group inside torch that neither destroy_process_group
    # nor the garbage collector drops, so gloo's worker threads outlive main() (crisp's own runs join them:
    # crisp.distributed.end_processes). A worker letting go of a collective's tensors while the interpreter
    # shuts down aborts the process; with the results on disk, leave without that shutdown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
