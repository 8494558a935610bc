"""Benchmark 3: exact full-vocabulary reverse KL and its backward over long sequences.

Qwen-sized vocabulary (151,936) with a tiny hidden size, T = 4,096 and 8,192 scored positions: the
fp32 logits of one side alone would take T x V x 4 bytes (4.6 GiB, 5.0 GB, at 8,192). crisp's
`crisp.losses.divergence_sum` never holds them; this measures its peak memory above the inputs and
its time, against the plain computation (`per_token_divergence` on the full logits, autograd) at
the lengths where that fits in memory. Sizes are in MiB and GiB (2^20 and 2^30 bytes).

Each measurement runs in a fresh process: inputs are made, the RSS high-water mark is reset, then
one forward + backward runs (peak memory above the inputs is read after it), then `--repeat` more
for the time (median).

The last line, RESULT, holds peak_gb (the chunked loss's peak above its inputs at the longest T,
in GiB) and time_ratio (chunked over unchunked time at the longest T where both ran).

    python bench/long_sequence_kl.py          # defaults: about 3 minutes on 2 cores
    python bench/long_sequence_kl.py --help
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import common
import torch
import torch.nn.functional as F

MODES = ("chunked", "full")


def parse_args(argv=None):
    parser = common.parser(__doc__)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lengths", default="4096,8192", help="positions T to score with the chunked loss")
    parser.add_argument(
        "--full-lengths",
        default="2048",
        help="T for the unchunked comparison (skipped when it would not fit in memory)",
    )
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=0, help="timed repetitions after the measured first run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def inputs(tokens: int, hidden: int, vocab: int):
    """Student hidden states and head (with gradients), a teacher's: the two sides of self-distillation."""
    generator = torch.Generator().manual_seed(0)
    student_hidden = torch.randn(tokens, hidden, generator=generator).requires_grad_(True)  # (T, H)
    student_weight = (0.05 * torch.randn(vocab, hidden, generator=generator)).requires_grad_(True)  # (V, H)
    teacher_hidden = student_hidden.detach() + 0.1 * torch.randn(tokens, hidden, generator=generator)  # (T, H)
    teacher_weight = student_weight.detach() + 0.01 * torch.randn(vocab, hidden, generator=generator)  # (V, H)
    return student_hidden, student_weight, teacher_hidden, teacher_weight


def loss_and_backward(mode: str, chunk_size: int, student_hidden, student_weight, teacher_hidden, teacher_weight):
    from crisp.losses import DivergenceSpec, divergence_sum, per_token_divergence

    student_hidden.grad, student_weight.grad = None, None
    if mode == "chunked":
        total, _ = divergence_sum(
            student_hidden, student_weight, teacher_hidden, teacher_weight, DivergenceSpec(), chunk_size=chunk_size
        )
    else:
        teacher_logits = F.linear(teacher_hidden, teacher_weight)  # (T, V)
        total = per_token_divergence(F.linear(student_hidden, student_weight), teacher_logits, kind="reverse_kl").sum()
    total.backward()
    return float(total)


def worker(args) -> dict:
    tensors = inputs(args.tokens, args.hidden, args.vocab)
    base = common.rss_mb()
    reset = common.reset_peak()
    wall, cpu = time.perf_counter(), time.process_time()
    value = loss_and_backward(args.worker, args.chunk_size, *tensors)
    times, cpu = [time.perf_counter() - wall], time.process_time() - cpu
    peak = common.peak_rss_mb()
    for _ in range(args.repeat):
        wall = time.perf_counter()
        loss_and_backward(args.worker, args.chunk_size, *tensors)
        times.append(time.perf_counter() - wall)
    return {
        "extra_mb": peak - base,
        "times": times,
        "cpu_time": cpu,
        "value": value,
        "grad_norm": float(tensors[1].grad.norm()),
        "peak_reset": reset,
    }


def available_mb() -> float:
    text = Path("/proc/meminfo").read_text()
    return int(text.split("MemAvailable:")[1].split()[0]) / 1024


def main() -> None:
    args = parse_args()
    if args.worker:
        torch.set_num_threads(args.threads)
        common.report(worker(args))
        return

    lengths = sorted({int(t) for t in args.lengths.split(",")} | {int(t) for t in args.full_lengths.split(",")})
    full_lengths = {int(t) for t in args.full_lengths.split(",")}
    logits_mb = {t: t * args.vocab * 4 / 2**20 for t in lengths}
    results = {}
    for tokens in lengths:
        modes = ["chunked"]
        if tokens in full_lengths:
            # the plain path holds about ten (T, V) fp32 tensors at its peak (measured: 9-10)
            if 11 * logits_mb[tokens] < 0.8 * available_mb():
                modes.append("full")
            else:
                print(f"T={tokens}: the unchunked loss would need ~{11 * logits_mb[tokens] / 1024:.0f} GiB; skipped")
        for mode in modes:
            flags = [
                "--worker",
                mode,
                f"--tokens={tokens}",
                f"--vocab={args.vocab}",
                f"--hidden={args.hidden}",
                f"--chunk-size={args.chunk_size}",
                f"--repeat={args.repeat}",
                f"--threads={args.threads}",
            ]
            results[tokens, mode] = common.run_worker(__file__, flags, args.threads)
            run = results[tokens, mode]
            print(
                f"T={tokens} {mode}: {run['extra_mb']:.0f} MiB above the inputs, "
                f"{', '.join(f'{t:.2f}' for t in run['times'])} s",
                flush=True,
            )

    print(
        f"\nReverse KL + backward, vocabulary {args.vocab}, hidden {args.hidden}, chunk {args.chunk_size} rows "
        f"(fp32, {args.threads} thread(s))"
    )
    print(f"machine: {common.machine()}\n")
    rows, ratios = [], {}
    for tokens in lengths:
        chunked = results[tokens, "chunked"]
        full = results.get((tokens, "full"))
        chunked_time = common.median(chunked["times"])
        row = [
            tokens,
            f"{logits_mb[tokens] / 1024:.2f}",
            f"{chunked['extra_mb'] / 1024:.2f}",
            f"{chunked_time:.1f} ({chunked['cpu_time']:.1f})",
        ]
        if full:
            full_time = common.median(full["times"])
            ratios[tokens] = chunked_time / full_time
            agree = abs(chunked["value"] - full["value"]) / abs(full["value"])
            row += [
                f"{full['extra_mb'] / 1024:.2f}",
                f"{full_time:.1f} ({full['cpu_time']:.1f})",
                f"{ratios[tokens]:.2f}",
                f"{agree:.1e}",
            ]
        else:
            row += ["-", "-", "-", "-"]
        rows.append(row)
    print(
        common.table(
            [
                "T",
                "one side's logits (GiB)",
                "chunked: peak above inputs (GiB)",
                "chunked: time (CPU) (s)",
                "unchunked: peak above inputs (GiB)",
                "unchunked: time (CPU) (s)",
                "time ratio",
                "loss rel. difference",
            ],
            rows,
        )
    )
    if not all(run["peak_reset"] for run in results.values()):
        print("note: this kernel could not reset the RSS high-water mark; peaks include set-up")
    longest = max(int(t) for t in args.lengths.split(","))
    compared = max(ratios) if ratios else None
    line = f"RESULT peak_gb={results[longest, 'chunked']['extra_mb'] / 1024:.3f} tokens={longest}"
    if compared:
        line += f" time_ratio={ratios[compared]:.3f} time_ratio_tokens={compared}"
    print("\n" + line)


if __name__ == "__main__":
    main()
