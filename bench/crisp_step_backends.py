"""Benchmark 5: one whole CRISP step with rollouts on HF generate against rollouts on vLLM.

`crisp.driver.train` itself, on the demo's CRISP settings (configs/demo/crisp.yaml:
32 prompts per step, one rollout each at temperature 1 and up to 256 tokens, a frozen teacher with
the v1 instruction, the mixed divergence, one thread), once with `rollout.backend: hf` and once with
`rollout.backend: vllm`. A step is everything the driver times (metrics.jsonl's time/*): generate,
grade, teacher prompts, teacher forward + loss + backward, the optimizer step (for vLLM with the
weight sync after it) and the teacher update. Step 1 is a warm-up; the median of the others is
reported, and the ratio vLLM / HF of the medians (target <= 0.6). Each run is a fresh process; the
backends alternate. The run's set-up (`Training(cfg)`: the model loaded and, for vLLM, the engine
built) is reported beside, as is the median time of the weight sync after an optimizer step.

The model is the demo's base model when --model names it (e.g. runs/demo/base/model, trained by
`crisp demo`), otherwise a randomly initialised one of its shape (whose rollouts all run to the cap).

    python bench/crisp_step_backends.py --model runs/demo/base/model
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import common

BACKENDS = ("hf", "vllm")


def parse_args(argv=None):
    parser = common.parser(__doc__)
    parser.add_argument("--model", help="a trained demo base model (default: a random one of its shape)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run (after one warm-up step)")
    parser.add_argument("--reps", type=int, default=2, help="runs per backend, alternating")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def demo_config(backend: str, model: str, out: Path, steps: int, threads: int) -> dict:
    import yaml

    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "demo" / "crisp.yaml").read_text())
    data.update(model={"path": model}, output_dir=str(out), max_steps=steps + 1, log_every=1, threads=threads)
    data["rollout"] = {**data["rollout"], "backend": backend}
    return data


def worker(args) -> dict:
    from crisp.config import validate
    from crisp.driver import Training

    with tempfile.TemporaryDirectory() as out:
        cfg = validate(demo_config(args.worker, args.model, Path(out) / "run", args.steps, args.threads))
        wall = time.perf_counter()
        training = Training(cfg)  # the model loaded, the optimizer, the generator (vllm: the engine built)
        setup = time.perf_counter() - wall
        syncs, sync = [], training.method.weights_changed  # after every step that stepped (vllm: the weight sync)

        def timed_sync():
            wall = time.perf_counter()
            sync()
            syncs.append(time.perf_counter() - wall)

        training.method.weights_changed = timed_sync
        training.run()
        rows = [json.loads(line) for line in (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [sum(v for k, v in row.items() if k.startswith("time/")) for row in rows]
    return {
        "times": steps[1:],
        "generate": [row["time/generate"] for row in rows[1:]],
        "mean_tokens": [row["rollout/mean_tokens"] for row in rows],
        "startup_s": setup,
        "sync_s": common.median(syncs) if syncs else None,
    }


def main() -> None:
    args = parse_args()
    if args.worker:
        common.report(worker(args))
        return
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model
        if model is None:
            model = str(Path(scratch) / "model")
            random_demo_model(Path(model))
        runs = {backend: [] for backend in BACKENDS}
        for rep in range(args.reps):
            for backend in BACKENDS if rep % 2 == 0 else BACKENDS[::-1]:
                flags = ["--worker", backend, "--model", model, f"--steps={args.steps}", f"--threads={args.threads}"]
                runs[backend].append(common.run_worker(__file__, flags, args.threads))
                print(
                    f"run {rep + 1}/{args.reps} {backend}: step times "
                    f"{', '.join(f'{t:.2f}' for t in runs[backend][-1]['times'])} s",
                    flush=True,
                )
    figures = {
        backend: {
            "time": common.median([t for run in runs[backend] for t in run["times"]]),
            "generate": common.median([t for run in runs[backend] for t in run["generate"]]),
            "tokens": common.median([t for run in runs[backend] for t in run["mean_tokens"]]),
            "startup": common.median([run["startup_s"] for run in runs[backend]]),
        }
        for backend in BACKENDS
    }
    sync = common.median([run["sync_s"] for run in runs["vllm"] if run["sync_s"] is not None])
    print(
        f"\nOne CRISP step on the demo's settings ({args.threads} thread(s)), model: "
        f"{args.model or 'random, demo shape'}"
    )
    print(f"machine: {common.machine()}\n")
    print(
        common.table(
            ["backend", "step, median (s)", "generate, median (s)", "mean rollout tokens", "set-up (s)"],
            [
                [b, f"{f['time']:.3f}", f"{f['generate']:.3f}", f"{f['tokens']:.1f}", f"{f['startup']:.2f}"]
                for b, f in figures.items()
            ],
        )
    )
    print(f"vLLM weight sync, median: {sync * 1000:.1f} ms per step")
    print(
        f"\nRESULT step_ratio={figures['vllm']['time'] / figures['hf']['time']:.3f} "
        f"generate_ratio={figures['vllm']['generate'] / figures['hf']['generate']:.3f} "
        f"vllm_startup_s={figures['vllm']['startup']:.2f} vllm_sync_ms={sync * 1000:.1f}"
    )


def random_demo_model(directory: Path) -> None:
    import yaml

    from crisp.data import synthetic
    from crisp.modeling import build_tiny_model, build_word_tokenizer, save_model

    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "demo" / "base.yaml").read_text())
    tiny = spec["model"]["tiny"]
    tokenizer = build_word_tokenizer(synthetic.vocabulary_texts(traces=300))
    model = build_tiny_model(
        tokenizer,
        architecture=tiny["architecture"],
        hidden_size=tiny["hidden_size"],
        num_layers=tiny["num_layers"],
        num_heads=tiny["num_heads"],
        intermediate_size=tiny["intermediate_size"],
        seed=0,
    )
    save_model(model, tokenizer, directory)


if __name__ == "__main__":
    main()
