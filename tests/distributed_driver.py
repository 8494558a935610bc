"""Run by `accelerate launch` from test_distributed.py: the first argument is a folder, each further
one a `crisp` command line.

Every rank runs the commands through crisp's CLI; when a training run saves its final model, each
rank first dumps the weights it holds to <output_dir>/weights-rank<r>.pt, so that the test can
check that the ranks ended identical. Then, as `crisp` itself does at its end, the rank ends its
process group, and writes the names of the threads it has left to <folder>/threads-rank<r>.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

import crisp.grpo
import crisp.selfdistill
import crisp.sft
from crisp import cli
from crisp.distributed import end_processes
from crisp.modeling import unwrap


def parity_rewards(batch, rollouts, records, **kwargs) -> list[float]:
    """A reward that a random model can earn, fixed by the rollout itself (the same on every rank)."""
    return [float(sum(r.token_ids) % 2) for r in rollouts]


def native_threads() -> list[str] | None:
    """The names the OS gives this process's threads (gloo's workers: pt_gloo_runloop, gloo_tcp_loop);
    None where there is no /proc."""
    tasks = Path("/proc/self/task")
    return sorted((task / "comm").read_text().strip() for task in tasks.iterdir()) if tasks.is_dir() else None


def dumping(save_final):
    def save_and_dump(accelerator, model, tokenizer, directory):
        weights = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}
        torch.save(weights, Path(directory).parent / f"weights-rank{accelerator.process_index}.pt")
        save_final(accelerator, model, tokenizer, directory)

    return save_and_dump


if __name__ == "__main__":
    for module in (crisp.selfdistill, crisp.grpo, crisp.sft):
        module.save_final = dumping(module.save_final)
    crisp.grpo.capped_rewards = parity_rewards
    folder, commands = Path(sys.argv[1]), sys.argv[2:]
    for command in commands:
        assert cli.run(command.split()) == 0, command
    end_processes()
    (folder / f"threads-rank{os.environ['RANK']}.json").write_text(json.dumps(native_threads()))
