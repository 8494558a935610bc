"""Shared pieces of the benchmarks: the random test model, one fresh process per measurement, peak
RSS, medians and the printed table.

Every measurement runs in a fresh Python process (the script re-invoked with `--worker ...`), so
that peak memory is that run's own and imports or caches of one side never help the other. The
parent alternates the sides (crisp, peer, peer, crisp, ...) so that a busy machine slows both alike,
and reports medians.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))  # this checkout's crisp, in the parent as in every worker
WORKER_PREFIX = "WORKER_RESULT "


# ----------------------------------------------------------------------------- the model


def word(i: int) -> str:
    """The i-th benchmark word: letters only ("x" + i in base 26), so that it is a single token."""
    letters = ""
    while True:
        i, digit = divmod(i, 26)
        letters = chr(ord("a") + digit) + letters
        if i == 0:
            return "x" + letters


def build_model(
    directory: Path,
    *,
    vocab: int,
    hidden: int,
    layers: int,
    heads: int,
    intermediate: int,
    max_positions: int = 4096,
    seed: int = 0,
) -> tuple[Path, int]:
    """A randomly initialised Qwen3-architecture model with exactly `vocab` tokens, saved to `directory`.

    The tokenizer is crisp's word-level one over benchmark words, each in two forms ("xab" at the
    start of a line, " xab" after a space), plus the chat template's own pieces. Returns the
    directory and how many words there are.
    """
    from crisp.modeling import build_tiny_model, build_word_tokenizer, save_model

    def tokenizer_with(words: int, extra: int):
        names = [word(i) for i in range(words + extra)]
        return build_word_tokenizer([" ".join(names[:words]), "\n".join(names), "\n\n"])

    fixed = len(tokenizer_with(1, 0)) - 2  # specials and the template's pieces
    words, extra = divmod(vocab - fixed, 2)
    tokenizer = tokenizer_with(words, extra)  # the odd one out exists only in its bare form
    assert len(tokenizer) == vocab, (len(tokenizer), vocab)
    model = build_tiny_model(
        tokenizer,
        architecture="qwen3",
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        intermediate_size=intermediate,
        max_positions=max_positions,
        seed=seed,
    )
    save_model(model, tokenizer, directory)
    return directory, words


def random_text(count: int, generator: torch.Generator, words: int) -> str:
    """`count` random benchmark words separated by spaces: `count` tokens."""
    return " ".join(word(int(i)) for i in torch.randint(0, words, (count,), generator=generator))


def chat_ids(tokenizer, text: str) -> list[int]:
    """The token ids of a one-turn user prompt, as both crisp and TRL build them."""
    return list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    )


def word_token_ids(tokenizer) -> torch.Tensor:
    """Ids of the ordinary word tokens (no special token, so no EOS and no padding)."""
    special = set(tokenizer.all_special_ids)
    return torch.tensor([i for i in range(len(tokenizer)) if i not in special])


def random_responses(tokenizer, count: int, length: int, generator: torch.Generator) -> list[list[int]]:
    """`count` rollouts of `length` random word tokens each (no EOS: every one runs to the cap)."""
    vocabulary = word_token_ids(tokenizer)
    return [
        vocabulary[torch.randint(0, len(vocabulary), (length,), generator=generator)].tolist() for _ in range(count)
    ]


# ----------------------------------------------------------------------------- memory


def rss_mb() -> float:
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """High-water mark of the resident set (VmHWM) since the process started or since reset_peak()."""
    return _status_mb("VmHWM")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_mb(field: str) -> float:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) / 1024


# ----------------------------------------------------------------------------- processes


def worker_env(threads: int) -> dict:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else str(SRC)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_worker(script: str, args: list[str], threads: int) -> dict:
    """Run `python script --worker ...args` in a fresh process and return the JSON it reports."""
    command = [sys.executable, script, *args]
    done = subprocess.run(command, capture_output=True, text=True, env=worker_env(threads))
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(WORKER_PREFIX):
            return json.loads(line[len(WORKER_PREFIX) :])
    raise RuntimeError(f"worker {' '.join(command)} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")


def report(result: dict) -> None:
    """The worker's last line: what the parent reads."""
    print(WORKER_PREFIX + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- numbers and tables


def median(values) -> float:
    return statistics.median(values)


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (it reads well in a terminal too)."""
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def machine() -> str:
    """CPU model, cores and memory, for the report."""
    cpu = "unknown CPU"
    try:
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = names[0] if names else cpu
        memory = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 2**20
        cpu += f", {os.cpu_count()} cores, {memory:.0f} GiB RAM"
    except OSError:
        pass
    return f"{cpu}; torch {torch.__version__}"


class StepTimer:
    """Wall and CPU time of each training step, into `result`. Step 1 is the untimed warm-up (where
    both sides' numbers are compared); after it the RSS high-water mark is reset, so the peak that
    finish() records covers the timed steps."""

    def __init__(self, result: dict):
        self.result = result
        result.update(loaded_rss_mb=rss_mb(), times=[], cpu_times=[])

    def start(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self, step: int) -> None:
        wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        if step == 1:
            self.result["base_rss_mb"] = rss_mb()
            self.result["peak_reset"] = reset_peak()
        else:
            self.result["times"].append(wall)
            self.result["cpu_times"].append(cpu)

    def finish(self) -> dict:
        self.result["peak_rss_mb"] = peak_rss_mb()
        return self.result


def train_trl_timed(trainer, result: dict, after_step=lambda step: None) -> dict:
    """Train a TRL trainer, timing each optimizer step from on_step_begin to on_step_end into `result`
    (StepTimer), with result["grad_norm"] the first clipped norm; `after_step(step)` runs after each
    step's timer stops. The timing callback is added last, after the trainer's own callbacks (e.g. a
    teacher sync), so their work is inside the timed step."""
    from transformers import TrainerCallback

    timer = StepTimer(result)
    clip = trainer._clip_grad_norm

    def recording_clip(model):
        norm = clip(model)
        result.setdefault("grad_norm", float(norm))
        return norm

    trainer._clip_grad_norm = recording_clip

    class Timing(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            timer.start()

        def on_step_end(self, args_, state, control, **kwargs):
            timer.stop(state.global_step)
            after_step(state.global_step)

    trainer.add_callback(Timing())
    trainer.train()
    return timer.finish()


def time_steps(max_steps: int, step) -> dict:
    """Run `step(i) -> (loss, gradient norm)` for i = 1..max_steps, timing each (StepTimer): the
    result holds every step's loss and the first step's gradient norm."""
    result = {"losses": []}
    timer = StepTimer(result)
    for i in range(1, max_steps + 1):
        timer.start()
        loss, grad_norm = step(i)
        timer.stop(i)
        result["losses"].append(loss)
        if i == 1:
            result["grad_norm"] = grad_norm
    return timer.finish()


# ----------------------------------------------------------------------------- crisp against a peer

SIDES = ("crisp", "trl")
# The optimizer both sides use (AdamW, lr 1e-5, no weight decay, gradients clipped to norm 1): as
# crisp's optim section, and as TRL's settings with a single-process, silent, unshuffled run.
CRISP_OPTIM = {"lr": 1e-5, "weight_decay": 0.0, "grad_clip": 1.0}
TRL_SETTINGS = dict(
    learning_rate=1e-5,
    weight_decay=0.0,
    max_grad_norm=1.0,
    shuffle_dataset=False,
    seed=0,
    use_cpu=True,
    logging_steps=10**6,
    save_strategy="no",
    report_to="none",
    disable_tqdm=True,
)


def parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's argument parser: --help shows its docstring as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def crisp_trainee(cfg):
    """The tokenizer, the model in training mode, its optimizer and scheduler, as a crisp run builds them."""
    from crisp.modeling import load_model, load_tokenizer
    from crisp.optim import build_optimizer

    tokenizer = load_tokenizer(cfg.model.path)
    model = load_model(cfg.model.path)
    model.train()
    optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.max_steps)
    return tokenizer, model, optimizer, scheduler


def add_model_args(parser) -> None:
    """The prompt and rollout lengths, the random model's shape, the repetitions and the worker
    plumbing both TRL benchmarks share."""
    parser.add_argument("--prompt-len", type=int, default=64, help="words in each prompt")
    parser.add_argument("--response-len", type=int, default=256, help="tokens in each rollout")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per run (after one warm-up step)")
    parser.add_argument("--reps", type=int, default=3, help="runs per side, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every run")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--batch", help=argparse.SUPPRESS)


def serve_worker(args, workers: dict) -> bool:
    """In a worker process (--worker SIDE): run that side on the saved batch, report, return True."""
    if not args.worker:
        return False
    torch.set_num_threads(args.threads)
    batch = json.loads(Path(args.batch).read_text())
    with tempfile.TemporaryDirectory() as out:
        report(workers[args.worker](args, batch, Path(out)))
    return True


def alternate_sides(script: str, args, make_batch, *, own_flags=(), extra_flags=lambda rep: []) -> tuple[dict, dict]:
    """Build the random model and the batch once, then run each side `reps` times in fresh
    processes, alternating the order. `own_flags`: option names the caller passes itself through
    `extra_flags(rep)`. Returns (batch, runs per side)."""
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model_dir, words = build_model(
            scratch / "model",
            vocab=args.vocab,
            hidden=args.hidden,
            layers=args.layers,
            heads=args.heads,
            intermediate=args.intermediate,
        )
        batch = make_batch(model_dir, words, args)
        (scratch / "batch.json").write_text(json.dumps(batch))
        skip = {"worker", "batch", *own_flags}
        runs = {side: [] for side in SIDES}
        for rep in range(args.reps):
            for side in SIDES if rep % 2 == 0 else SIDES[::-1]:
                flags = ["--worker", side, "--batch", str(scratch / "batch.json")]
                flags += [
                    f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in skip and v is not None
                ]
                runs[side].append(run_worker(script, flags + extra_flags(rep), args.threads))
                print(
                    f"run {rep + 1}/{args.reps} {side}: step times "
                    f"{', '.join(f'{t:.2f}' for t in runs[side][-1]['times'])} s",
                    flush=True,
                )
    return batch, runs


def side_figures(runs: dict) -> dict:
    """Per side: median step time and CPU time over every timed step, median peak RSS and peak RSS
    above the loaded model over the runs."""
    return {
        side: {
            "time": median([t for run in runs[side] for t in run["times"]]),
            "cpu": median([t for run in runs[side] for t in run["cpu_times"]]),
            "peak": median([run["peak_rss_mb"] for run in runs[side]]),
            "extra": median([run["peak_rss_mb"] - run["loaded_rss_mb"] for run in runs[side]]),
        }
        for side in SIDES
    }


def ratio_rows(crisp: dict, trl: dict) -> list[list[str]]:
    return [
        [
            "time per step, median (s)",
            f"{crisp['time']:.3f}",
            f"{trl['time']:.3f}",
            f"{crisp['time'] / trl['time']:.2f}",
        ],
        [
            "CPU time per step, median (s)",
            f"{crisp['cpu']:.3f}",
            f"{trl['cpu']:.3f}",
            f"{crisp['cpu'] / trl['cpu']:.2f}",
        ],
        [
            "peak RSS during the timed steps (MiB)",
            f"{crisp['peak']:.0f}",
            f"{trl['peak']:.0f}",
            f"{crisp['peak'] / trl['peak']:.2f}",
        ],
        [
            "peak RSS above the loaded model (MiB)",
            f"{crisp['extra']:.0f}",
            f"{trl['extra']:.0f}",
            f"{crisp['extra'] / trl['extra']:.2f}",
        ],
    ]


def print_ratios(runs: dict, crisp: dict, trl: dict) -> None:
    """The run-by-run time ratios, a note where peaks include set-up, and the RESULT line."""
    paired = [median(c["times"]) / median(t["times"]) for c, t in zip(runs["crisp"], runs["trl"])]
    print(f"\ncrisp / TRL time, run by run (each pair ran back to back): {', '.join(f'{r:.2f}' for r in paired)}")
    if not all(run["peak_reset"] for side in SIDES for run in runs[side]):
        print("note: this kernel could not reset the RSS high-water mark; peaks include set-up")
    print(
        f"\nRESULT time_ratio={crisp['time'] / trl['time']:.3f} memory_ratio={crisp['peak'] / trl['peak']:.3f} "
        f"cpu_ratio={crisp['cpu'] / trl['cpu']:.3f} extra_memory_ratio={crisp['extra'] / trl['extra']:.3f}"
    )


def trl_version() -> str:
    from importlib.metadata import version

    return version("trl")
