"""Run by `accelerate launch` from test_distributed.py: the first argument is a folder, each further
one a `crisp` command line.

Every rank runs the commands as crisp's CLI would (`run_command`); a training run rewards GRPO's
rollouts with conftest.parity_reward (a random model earns the task's reward too rarely), and when
its steps are done each rank dumps the weights it holds to <output_dir>/weights-rank<r>.pt, so that the
test can check that the ranks ended identical. Then, as `crisp` itself does at its end, the rank
ends its process group, and writes the names of the threads it has left to
<folder>/threads-rank<r>.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from conftest import parity_reward

from crisp import cli
from crisp.config import load_config
from crisp.distributed import end_processes
from crisp.driver import Training
from crisp.modeling import unwrap


def run_command(words: list[str]) -> None:
    """`crisp eval ...` through the CLI; `crisp train CONFIG overrides...` through the driver, with
    the parity reward for GRPO and each rank's weights dumped at the end."""
    if words[0] != "train":
        assert cli.run(words) == 0, words
        return
    cfg = load_config(words[1], words[2:])
    training = Training(cfg, **({"reward": parity_reward} if cfg.method == "grpo" else {}))
    training.train_steps()
    weights = {k: v.detach().clone() for k, v in unwrap(training.trainer.model).state_dict().items()}
    torch.save(weights, Path(cfg.output_dir) / f"weights-rank{training.accelerator.process_index}.pt")
    training.save_final()


def native_threads() -> list[str] | None:
    """The names the OS gives this process's threads (gloo's workers: pt_gloo_runloop, gloo_tcp_loop);
    None where there is no /proc."""
    tasks = Path("/proc/self/task")
    return sorted((task / "comm").read_text().strip() for task in tasks.iterdir()) if tasks.is_dir() else None


if __name__ == "__main__":
    folder, commands = Path(sys.argv[1]), sys.argv[2:]
    for command in commands:
        run_command(command.split())
    end_processes()
    (folder / f"threads-rank{os.environ['RANK']}.json").write_text(json.dumps(native_threads()))
