"""Benchmark 2: one GRPO (DAPO) step, crisp against TRL's GRPOTrainer (loss_type="dapo"), side by side.

Both sides train the same randomly initialised Qwen3-architecture model (hidden 256, 4 layers, a
32,000-token vocabulary) on the same G rollouts per prompt with the same rewards (alternately 0 and
1 within each group, so every group carries signal and no rollout is skipped): group-normalised
advantages, DAPO's clipped surrogate with eps_low 0.2 and eps_high 0.28, the token sum divided by
the batch's response tokens, no KL term, one optimizer step per batch (so the old log-probs are the
current ones on both sides), AdamW (lr 1e-5, no weight decay), gradients clipped to norm 1, fp32
(TRL's CPU default of bf16 autocast is turned off).

Generation is excluded on both sides: the rollouts are fixed token ids made up front. What a timed
step covers:
  crisp  crisp.rewards.group_advantages, crisp.methods.grpo.surrogate_backward (forward at the response
         positions, chunked log-probs, surrogate, backward), crisp.optim.step_if_finite and the
         scheduler step: the loop's loss_backward and step phases.
  TRL    Trainer.train from on_step_begin to on_step_end of one optimizer step: GRPOTrainer's
         _generate_and_score_completions (prompt tokenisation; its generation call returns the
         fixed rollouts; decoding, the reward function, advantages), compute_loss, backward, clip,
         optimizer and scheduler steps.
The advantages differ by one constant factor: TRL divides by the sample standard deviation + 1e-4,
crisp by the population one + 1e-6 (GRPO's definition); the gradient norms at the untimed warm-up
step are compared with that factor taken out. Each run is a fresh process; runs alternate between
the sides and medians are reported.

    python bench/grpo_vs_trl.py              # defaults: about 4 minutes on 2 cores
    python bench/grpo_vs_trl.py --help

Needs `pip install 'crisp[bench]'` (trl==1.16.0).
"""

from __future__ import annotations

from pathlib import Path

import common
import torch


def parse_args(argv=None):
    parser = common.parser(__doc__)
    parser.add_argument("--prompts", type=int, default=1, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=8, help="G rollouts per prompt")
    common.add_model_args(parser)
    return parser.parse_args(argv)


def make_batch(model_dir: Path, words: int, args) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(0)
    prompts = [common.random_text(args.prompt_len, generator, words) for _ in range(args.prompts)]
    count = args.prompts * args.group_size
    return {
        "model_dir": str(model_dir),
        "prompts": prompts,
        "prompt_ids": [common.chat_ids(tokenizer, prompts[i // args.group_size]) for i in range(count)],
        "responses": common.random_responses(tokenizer, count, args.response_len, generator),
        "rewards": [float(i % 2) for i in range(count)],  # mixed rewards in every group
    }


# ----------------------------------------------------------------------------- crisp


def worker_crisp(args, batch: dict, out: Path) -> dict:
    from crisp.config import validate
    from crisp.distributed import micro_batches
    from crisp.methods.grpo import loss_normaliser, surrogate_backward
    from crisp.optim import step_if_finite
    from crisp.rewards import group_advantages
    from crisp.rollout import Rollout

    cfg = validate(
        {
            "method": "grpo",
            "output_dir": str(out),
            "max_steps": 1 + args.steps,
            "model": {"path": batch["model_dir"]},
            "batch_size": args.prompts,
            "group_size": args.group_size,
            "micro_batch_size": args.prompts * args.group_size,
            "schedule": {"kind": "constant", "l_min": args.response_len, "l_max": args.response_len},
            "eps_low": 0.2,
            "eps_high": 0.28,
            "aggregation": "token",
            "loss_normaliser": "batch_tokens",
            "optim": common.CRISP_OPTIM,
        }
    )
    tokenizer, policy, optimizer, scheduler = common.crisp_trainee(cfg)
    rollouts = [
        Rollout(i // args.group_size, tuple(p), tuple(r), "", "length")
        for i, (p, r) in enumerate(zip(batch["prompt_ids"], batch["responses"]))
    ]

    def step(_: int):
        advantages = group_advantages(torch.tensor(batch["rewards"]), cfg.group_size, scale_by_std=cfg.scale_by_std)
        if not advantages.ne(0).all():
            raise AssertionError("every rollout must carry signal, or crisp would skip some")
        normaliser = loss_normaliser(cfg, sum(r.num_tokens for r in rollouts))
        loss, _ = surrogate_backward(
            policy,
            rollouts,
            advantages,
            cfg.surrogate(),
            pad_id=tokenizer.pad_token_id,
            chunk_size=cfg.chunk_size,
            normaliser=normaliser,
            num_train=len(rollouts),
            micro=micro_batches(len(rollouts), cfg.micro_batch_size, None),
        )
        grad_norm, _ = step_if_finite(policy, optimizer, loss, cfg.optim.grad_clip)
        scheduler.step()
        return loss, grad_norm

    return common.time_steps(cfg.max_steps, step)


# ----------------------------------------------------------------------------- TRL


def worker_trl(args, batch: dict, out: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    class FixedRollouts(GRPOTrainer):
        """GRPOTrainer whose generation call returns the benchmark's rollouts (generation excluded)."""

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
            if [list(p) for p in prompt_ids] != batch["prompt_ids"]:
                raise AssertionError("TRL tokenised the prompts differently from crisp: not the same batch")
            return [list(r) for r in batch["responses"]], None

    def reward(prompts, completions, completion_ids, **kwargs):
        if [list(c) for c in completion_ids] != batch["responses"]:
            raise AssertionError("the rewards would not go to the benchmark's rollouts")
        return batch["rewards"]

    tokenizer = AutoTokenizer.from_pretrained(batch["model_dir"])
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in batch["prompts"]])
    config = GRPOConfig(
        output_dir=str(out),
        max_steps=1 + args.steps,
        per_device_train_batch_size=args.prompts * args.group_size,
        gradient_accumulation_steps=1,
        num_generations=args.group_size,
        max_completion_length=args.response_len,
        loss_type="dapo",
        epsilon=0.2,
        epsilon_high=0.28,
        beta=0.0,
        scale_rewards="group",
        bf16=False,
        **common.TRL_SETTINGS,
    )
    trainer = FixedRollouts(
        model=batch["model_dir"], args=config, train_dataset=dataset, processing_class=tokenizer, reward_funcs=reward
    )
    return common.train_trl_timed(trainer, {})


# ----------------------------------------------------------------------------- parent


def advantage_scale(rewards: list[float], group_size: int) -> float:
    """crisp's advantages over TRL's for these rewards (one factor when every group has the same spread)."""
    groups = torch.tensor(rewards, dtype=torch.float64).view(-1, group_size)
    factors = (groups.std(dim=1) + 1e-4) / (groups.std(dim=1, unbiased=False) + 1e-6)
    if not torch.allclose(factors, factors[0]):
        raise ValueError("the groups' reward spreads differ: no single factor")
    return float(factors[0])


def main() -> None:
    args = parse_args()
    if common.serve_worker(args, {"crisp": worker_crisp, "trl": worker_trl}):
        return
    batch, runs = common.alternate_sides(__file__, args, make_batch)
    figures = common.side_figures(runs)
    scale = advantage_scale(batch["rewards"], args.group_size)
    norms = {side: runs[side][0]["grad_norm"] for side in common.SIDES}
    prompt_tokens = len(batch["prompt_ids"][0])

    print(f"\nGRPO (DAPO) step, crisp vs TRL {common.trl_version()} GRPOTrainer (fp32, {args.threads} thread(s))")
    print(f"machine: {common.machine()}")
    print(
        f"model: Qwen3 architecture, hidden {args.hidden}, {args.layers} layers, vocabulary {args.vocab}; "
        f"batch: {args.prompts} prompt(s) of {prompt_tokens} tokens x G = {args.group_size} rollouts of "
        f"{args.response_len} tokens; {args.reps} runs x {args.steps} timed steps per side\n"
    )
    rows = common.ratio_rows(figures["crisp"], figures["trl"]) + [
        [
            "gradient norm at step 1 (TRL's x the advantage factor)",
            f"{norms['crisp']:.6g}",
            f"{norms['trl'] * scale:.6g}",
            "",
        ],
    ]
    print(common.table(["", "crisp", "TRL", "crisp / TRL"], rows))
    common.print_ratios(runs, figures["crisp"], figures["trl"])


if __name__ == "__main__":
    main()
