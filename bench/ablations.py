"""Self-distillation ablations on the synthetic task: CRISP's teacher refresh period M, the
divergence and the instruction; OPSD's rollout filter.

Replicates the CRISP paper's ablation grid on the demo's base model: M in {1, 10, 50, frozen} with
reverse KL, then forward KL, the mixed divergence and JSD with a frozen teacher; the demo's CRISP
with the v2 (difficulty-aware) instruction; and the demo's OPSD trained on incorrect rollouts only
(the compaction paper's contrast to correct-only). Every variant gets the same base, budget and
seed; each is evaluated like the demo (held-out split, k samples).

    python bench/ablations.py --base runs/demo/base/model --out runs/ablations

Variants already evaluated under --out are read back, not retrained, so the grid can be split over
several processes with --only and then gathered by a last run without --only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from crisp.config import EvalConfig, load_config, validate
from crisp.demo import evaluate_row, load
from crisp.driver import train
from crisp.report import format_table, write_report

VARIANTS = {  # name -> (demo config, overrides)
    "M=1 reverse": ("crisp.yaml", ["teacher.update=refresh", "teacher.refresh_every=1", "loss.divergence=reverse_kl"]),
    "M=10 reverse": (
        "crisp.yaml",
        ["teacher.update=refresh", "teacher.refresh_every=10", "loss.divergence=reverse_kl"],
    ),
    "M=50 reverse": (
        "crisp.yaml",
        ["teacher.update=refresh", "teacher.refresh_every=50", "loss.divergence=reverse_kl"],
    ),
    "frozen reverse": ("crisp.yaml", ["teacher.update=frozen", "loss.divergence=reverse_kl"]),
    "frozen forward": ("crisp.yaml", ["teacher.update=frozen", "loss.divergence=forward_kl"]),
    "frozen mixed": ("crisp.yaml", ["teacher.update=frozen", "loss.divergence=mixed"]),
    "frozen jsd": ("crisp.yaml", ["teacher.update=frozen", "loss.divergence=jsd", "loss.beta=0.5"]),
    "v2 frozen mixed": ("crisp.yaml", ["teacher.instruction=v2"]),
    "OPSD incorrect-only": ("opsd.yaml", ["rollout_filter=incorrect"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="runs/demo/base/model")
    parser.add_argument("--out", default="runs/ablations")
    parser.add_argument("--configs", default="configs")
    parser.add_argument("--steps", type=int, default=None, help="override max_steps of the demo configs")
    parser.add_argument("--only", default=None, help="comma-separated variant names")
    args = parser.parse_args()

    configs, out = Path(args.configs), Path(args.out)
    eval_cfg = validate(yaml.safe_load((configs / "demo" / "eval.yaml").read_text()), EvalConfig)
    template = load_config(configs / "demo" / "base.yaml").prompt.template
    names = args.only.split(",") if args.only else list(VARIANTS)

    def evaluated(directory: Path, model_dir: Path) -> dict:  # reuse a finished evaluation (runs can be split)
        summary = directory / "summary.json"
        if summary.is_file():
            return json.loads(summary.read_text())
        return evaluate_row(model_dir, load(model_dir), eval_cfg, directory, instruction=None, template=template)

    rows = {"base": evaluated(out / "base", Path(args.base))}
    for name in names:
        slug = name.replace(" ", "_").replace("=", "")
        if (out / slug / "eval" / "summary.json").is_file():
            rows[name] = evaluated(out / slug / "eval", out / slug / "model")
            continue
        config, variant = VARIANTS[name]
        overrides = [f"output_dir={out / slug}", f"model.path={args.base}", *variant]
        if args.steps:
            overrides.append(f"max_steps={args.steps}")
        cfg = load_config(configs / "demo" / config, overrides)
        model_dir = train(cfg)
        rows[name] = evaluate_row(
            model_dir, load(model_dir), eval_cfg, out / slug / "eval", instruction=None, template=template
        )
        print(format_table(rows, baseline="base"), flush=True)
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    write_report(out, rows, baseline="base", title="CRISP ablations on the synthetic task")
    print(f"\nwrote {out}/report.md")


if __name__ == "__main__":
    main()
