"""Benchmark 1: one self-distillation step, crisp against TRL's SDFTTrainer, side by side.

Both sides train the same randomly initialised Qwen3-architecture model (hidden 256, 4 layers, a
32,000-token vocabulary, so that the LM head dominates) on the same batch: the same prompt token ids,
the same teacher prompts (the prompt, a blank line, then a privileged context, TRL's template), the
same rollout token ids; exact full-vocabulary reverse KL KL(student || teacher) on every response
token; AdamW (lr 1e-5, no weight decay), gradients clipped to norm 1; the teacher hard-refreshed from
the student after every step (crisp: teacher.update=refresh, refresh_every=1; TRL:
teacher_model_kind="ema" with teacher_update_rate=1.0 and teacher_sync_steps=1, a copy). Both
compute in fp32 (TRL's default on CPU is bf16 autocast; it is turned off so that both do the same
arithmetic).

Generation is excluded on both sides: the rollouts are fixed token ids made up front. What a timed
step covers:
  crisp  crisp.methods.selfdistill.distill_backward (student and teacher forwards, loss, backward), then
         crisp.optim.step_if_finite (clip, AdamW step), the scheduler step and the teacher refresh:
         the loop's loss_backward, step and teacher_update phases.
  TRL    Trainer.train from on_step_begin to on_step_end of one optimizer step: SDFTTrainer's input
         preparation (prompt tokenisation, teacher prompts; its generation call returns the fixed
         rollouts), compute_loss, backward, clip, optimizer and scheduler steps, and the teacher sync
         callback.
The first step of each run is a warm-up and not timed; it is where both sides' losses and gradient
norms are compared (they must agree: same model, same batch, same loss). Each run is a fresh
process; runs alternate between the sides and medians are reported.

    python bench/selfdistill_vs_trl.py              # defaults: about 4 minutes on 2 cores
    python bench/selfdistill_vs_trl.py --help

Needs `pip install 'crisp[bench]'` (trl==1.16.0).
"""

from __future__ import annotations

import time
from pathlib import Path

import common
import torch


def parse_args(argv=None):
    parser = common.parser(__doc__)
    parser.add_argument("--rollouts", type=int, default=8, help="rollouts per step (one per prompt, as CRISP)")
    parser.add_argument("--context-len", type=int, default=32, help="extra words in each teacher prompt")
    parser.add_argument("--chunk-size", type=int, default=128, help="crisp's loss.chunk_size")
    parser.add_argument("--no-generation", action="store_true", help="skip timing HF generate for the batch")
    parser.add_argument(
        "--trl-bf16",
        action="store_true",
        help="leave TRL on its CPU default, bf16 autocast (crisp stays fp32): not the same arithmetic",
    )
    common.add_model_args(parser)
    return parser.parse_args(argv)


def make_batch(model_dir: Path, words: int, args) -> dict:
    """Prompt texts and the token ids both sides train on."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(0)
    prompts = [common.random_text(args.prompt_len, generator, words) for _ in range(args.rollouts)]
    contexts = [common.random_text(args.context_len, generator, words) for _ in range(args.rollouts)]
    responses = common.random_responses(tokenizer, args.rollouts, args.response_len, generator)
    return {
        "model_dir": str(model_dir),
        "prompts": prompts,
        "contexts": contexts,
        "student_ids": [common.chat_ids(tokenizer, p) for p in prompts],
        "teacher_ids": [common.chat_ids(tokenizer, f"{p}\n\n{c}") for p, c in zip(prompts, contexts)],
        "responses": responses,
    }


# ----------------------------------------------------------------------------- crisp


def worker_crisp(args, batch: dict, out: Path) -> dict:
    from crisp.config import validate
    from crisp.methods.selfdistill import DistillBatch, distill_backward
    from crisp.optim import step_if_finite
    from crisp.rollout import HFGenerator, Rollout
    from crisp.teacher import Teacher

    cfg = validate(
        {
            "method": "selfdistill",
            "output_dir": str(out),
            "max_steps": 1 + args.steps,
            "model": {"path": batch["model_dir"]},
            "batch_size": args.rollouts,
            "micro_batch_size": args.rollouts,
            "rollout": {"n": 1, "temperature": 1.0, "max_new_tokens": args.response_len},
            "teacher": {"update": "refresh", "refresh_every": 1},
            "loss": {"divergence": "reverse_kl", "chunk_size": args.chunk_size},
            "optim": common.CRISP_OPTIM,
        }
    )
    tokenizer, student, optimizer, scheduler = common.crisp_trainee(cfg)
    teacher = Teacher(student, update=cfg.teacher.update, refresh_every=cfg.teacher.refresh_every)
    rollouts = [
        Rollout(i, tuple(p), tuple(r), "", "length")
        for i, (p, r) in enumerate(zip(batch["student_ids"], batch["responses"]))
    ]

    def step(i: int):
        loss = distill_backward(
            student,
            teacher,
            DistillBatch(rollouts, batch["teacher_ids"]),
            cfg.loss,
            pad_id=tokenizer.pad_token_id,
            micro_batch_size=cfg.micro_batch_size,
        )
        grad_norm, _ = step_if_finite(student, optimizer, loss, cfg.optim.grad_clip)
        scheduler.step()
        teacher.after_step(i, student)
        return loss, grad_norm

    result = common.time_steps(cfg.max_steps, step)

    if args.generate:  # what generating these rollouts would cost (HF generate, crisp's backend)
        generator = HFGenerator(student, tokenizer, batch_size=args.rollouts)
        wall = time.perf_counter()
        generated = generator.generate(batch["student_ids"], cfg.rollout, seed=0)
        result["generation_s"] = time.perf_counter() - wall
        result["generated_tokens"] = sum(r.num_tokens for r in generated)
    return result


# ----------------------------------------------------------------------------- TRL


def worker_trl(args, batch: dict, out: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    responses = batch["responses"]

    class FixedRollouts(SDFTTrainer):
        """SDFTTrainer whose generation call returns the benchmark's rollouts (generation excluded)."""

        def _generate(self, prompt_ids):
            if [list(p) for p in prompt_ids] != batch["student_ids"]:
                raise AssertionError("TRL tokenised the prompts differently from crisp: not the same batch")
            return prompt_ids, [list(r) for r in responses]

    tokenizer = AutoTokenizer.from_pretrained(batch["model_dir"])
    dataset = Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": p}], "privileged_context": c}
            for p, c in zip(batch["prompts"], batch["contexts"])
        ]
    )
    config = SDFTConfig(
        output_dir=str(out),
        max_steps=1 + args.steps,
        per_device_train_batch_size=args.rollouts,
        gradient_accumulation_steps=1,
        num_generations=1,
        max_completion_length=args.response_len,
        max_prompt_length=None,
        distillation_mode="full_logits",
        distillation_alpha=1.0,  # alpha 1: reverse KL
        distillation_is_clip=None,
        teacher_model_kind="ema",
        teacher_update_rate=1.0,
        teacher_sync_steps=1,
        bf16=args.trl_bf16,
        **common.TRL_SETTINGS,
    )
    trainer = FixedRollouts(model=batch["model_dir"], args=config, train_dataset=dataset, processing_class=tokenizer)
    result = {"losses": []}

    def after_step(step: int) -> None:
        result["losses"].append(trainer._metrics["train"]["self_distillation/distillation_loss"][-1])
        if step == 1:
            teacher_rows = trainer._buffered_inputs[0]
            for ids, mask, want, response in zip(
                teacher_rows["teacher_input_ids"],
                teacher_rows["teacher_attention_mask"],
                batch["teacher_ids"],
                responses,
            ):
                if ids[mask.bool()].tolist() != want + response:
                    raise AssertionError("TRL's teacher input differs from crisp's: not the same batch")

    return common.train_trl_timed(trainer, result, after_step)


# ----------------------------------------------------------------------------- parent


def main() -> None:
    args = parse_args()
    args.generate = not args.no_generation
    if common.serve_worker(args, {"crisp": worker_crisp, "trl": worker_trl}):
        return

    def extra_flags(rep: int) -> list[str]:  # generation is timed once, in the first pair of runs
        return (["--no-generation"] if args.no_generation or rep > 0 else []) + (
            ["--trl-bf16"] if args.trl_bf16 else []
        )

    batch, runs = common.alternate_sides(
        __file__, args, make_batch, own_flags=("no_generation", "trl_bf16", "generate"), extra_flags=extra_flags
    )
    figures = common.side_figures(runs)
    crisp = figures["crisp"]
    first = {side: runs[side][0] for side in common.SIDES}
    prompt_tokens = sum(map(len, batch["student_ids"])) / args.rollouts
    teacher_tokens = sum(map(len, batch["teacher_ids"])) / args.rollouts

    precision = "crisp fp32, TRL bf16 autocast" if args.trl_bf16 else "fp32"
    print(
        f"\nSelf-distillation step, crisp vs TRL {common.trl_version()} SDFTTrainer ({precision}, "
        f"{args.threads} thread(s))"
    )
    print(f"machine: {common.machine()}")
    print(
        f"model: Qwen3 architecture, hidden {args.hidden}, {args.layers} layers, vocabulary {args.vocab}; "
        f"batch: {args.rollouts} rollouts x {args.response_len} tokens, prompts {prompt_tokens:.0f} tokens, "
        f"teacher prompts {teacher_tokens:.0f} tokens; {args.reps} runs x {args.steps} timed steps per side\n"
    )
    rows = common.ratio_rows(crisp, figures["trl"]) + [
        [
            "loss at step 1 / step 2",
            " / ".join(f"{x:.6g}" for x in first["crisp"]["losses"][:2]),
            " / ".join(f"{x:.6g}" for x in first["trl"]["losses"][:2]),
            "",
        ],
        ["gradient norm at step 1", f"{first['crisp']['grad_norm']:.6g}", f"{first['trl']['grad_norm']:.6g}", ""],
    ]
    print(common.table(["", "crisp", "TRL", "crisp / TRL"], rows))
    if "generation_s" in first["crisp"]:
        generation = first["crisp"]["generation_s"]
        print(
            f"\nGenerating this batch with HF generate (not in the timed step): {generation:.2f} s for "
            f"{first['crisp']['generated_tokens']} tokens; with it a crisp step would be "
            f"{generation + crisp['time']:.2f} s, {100 * generation / (generation + crisp['time']):.0f}% generating."
        )
    common.print_ratios(runs, crisp, figures["trl"])


if __name__ == "__main__":
    main()
