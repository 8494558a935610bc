"""Run by `accelerate launch` from test_distributed.py: each argument is one `crisp` command line.

Every rank runs the commands through crisp's CLI; when a training run saves its final model, each
rank first dumps the weights it holds to <output_dir>/weights-rank<r>.pt, so that the test can
check that the ranks ended identical.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import crisp.grpo
import crisp.selfdistill
import crisp.sft
from crisp import cli
from crisp.modeling import unwrap


def parity_rewards(batch, rollouts, records, **kwargs) -> list[float]:
    """A reward that a random model can earn, fixed by the rollout itself (the same on every rank)."""
    return [float(sum(r.token_ids) % 2) for r in rollouts]


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
    for command in sys.argv[1:]:
        cli.main(command.split())
