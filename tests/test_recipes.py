"""Every real-model recipe runs one step, so that a recipe can never rot.

Each recipe is loaded as written and run with a tiny random model of the same architecture family
(built from a config: no download), a tiny problem file, one step and small lengths. Nothing else
is overridden: LoRA, teacher, loss, schedule kind, optimizer, bf16 autocast and gradient
checkpointing run as the recipe says, and the test checks that the overrides touched no other key.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, parity_reward, read_metrics

from crisp import cli
from crisp.config import EvalRunConfig, load_config
from crisp.driver import train
from crisp.modeling import DTYPES, build_tiny_model, load_model, save_model

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "configs" / "recipes"
FIXTURES = Path(__file__).parent / "fixtures"
PROBLEMS = FIXTURES / "math500_sample.jsonl"  # questions, answers and reference solutions

# The model_type in each hub model's config.json.
FAMILY = {
    "Qwen/Qwen3-8B": "qwen3",
    "Qwen/Qwen3-1.7B": "qwen3",
    "Qwen/Qwen3-4B": "qwen3",
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": "qwen2",
}

TINY_STAGES = "[{max_length: 4, steps: 100}, {max_length: 6, steps: 100}, {max_length: 8, steps: 100}]"

# What each recipe must shrink to run on a CPU in seconds: lengths and, for SIRI, the batch.
SHRINK = {
    "crisp-qwen3-8b": ["rollout.max_new_tokens=8"],
    "opsd-qwen3-1.7b": ["rollout.max_new_tokens=8"],
    "siri-r1-distill-qwen-1.5b": [
        "batch_size=2",
        "group_size=4",
        "generation_batch_size=8",
        "schedule.l_min=4",
        "schedule.l_max=8",
    ],
    # the stages as written but for their lengths
    "tfpi-qwen3-4b": ["batch_size=2", "generation_batch_size=8", "schedule.stages=" + TINY_STAGES],
    "tfpi-r1-distill-qwen-1.5b": ["batch_size=2", "generation_batch_size=8", "schedule.stages=" + TINY_STAGES],
}


def training_recipes() -> list[Path]:
    return sorted(p for p in RECIPES.glob("*.yaml") if "method" in yaml.safe_load(p.read_text()))


def test_every_training_recipe_is_covered():
    assert {p.stem for p in training_recipes()} == set(SHRINK)


@pytest.fixture(scope="module")
def family_models(tiny_tokenizer, tmp_path_factory) -> dict[str, Path]:
    """A saved tiny random model per architecture family."""
    models = {}
    for family in sorted(set(FAMILY.values())):
        directory = tmp_path_factory.mktemp(family)
        save_model(build_tiny_model(tiny_tokenizer, architecture=family, seed=0, **TINY), tiny_tokenizer, directory)
        models[family] = directory
    return models


def flat(data, prefix="") -> dict:
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): data}


def assert_only_overridden(written, run, overrides: list[str]) -> None:
    keys = {item.split("=", 1)[0] for item in overrides}
    before, after = flat(written.model_dump(mode="json")), flat(run.model_dump(mode="json"))
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed <= keys, f"overrides changed {sorted(changed - keys)} too"


@pytest.mark.parametrize("recipe", training_recipes(), ids=lambda p: p.stem)
def test_recipe_runs_one_step_on_a_tiny_model_of_its_family(recipe, family_models, tmp_path):
    written = load_config(recipe)
    family = FAMILY[written.model.path]
    out = tmp_path / "run"
    overrides = [
        f"model.path={family_models[family]}",
        f"data.source={PROBLEMS}",
        "max_steps=1",
        f"output_dir={out}",
        *SHRINK[recipe.stem],
    ]
    run = load_config(recipe, overrides)
    assert_only_overridden(written, run, overrides)
    assert load_model(str(family_models[family])).config.model_type == family
    # a random model earns no reward: give about half the rollouts one, so that a GRPO step updates
    train(run, **({"reward": parity_reward} if run.method == "grpo" else {}))

    (metrics,) = read_metrics(out)
    assert metrics["step"] == 1 and metrics["train/skipped_steps"] == 0
    if run.method == "grpo" and run.schedule.kind == "stages":  # TFPI: stage 1, in the prompt mode as written
        assert (metrics["rollout/stage"], metrics["train/stage_start"]) == (1, 1)
        assert metrics["rollout/max_len"] == run.schedule.stages[0].max_length
        assert metrics["rollout/thinking_free"] is run.prompt.thinking_free is True
    assert metrics["train/loss"] is not None and metrics["train/grad_norm"] > 0
    initial, trained = (load_model(str(d)).state_dict() for d in (family_models[family], out / "model"))
    stored = DTYPES[run.model.dtype]  # a bf16 recipe rounds the weights it loads: compare the rounded ones
    changed = [k for k in initial if not torch.equal(initial[k].to(stored).float(), trained[k].float())]
    assert changed  # the step moved the weights
    if run.model.lora:
        assert all(k.endswith("proj.weight") for k in changed)  # merged LoRA update only
        assert (out / "model" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize(
    "recipe, lengths", [("tfpi-qwen3-4b", [4096, 8192, 16384]), ("tfpi-r1-distill-qwen-1.5b", [2048, 4096, 8192])]
)
def test_tfpi_recipes_keep_the_papers_settings(recipe, lengths):
    cfg = load_config(RECIPES / f"{recipe}.yaml")
    assert cfg.prompt.thinking_free and cfg.schedule.kind == "stages"
    assert [s.max_length for s in cfg.schedule.stages] == lengths
    assert sum(s.steps for s in cfg.schedule.stages) == cfg.max_steps
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.group_size, cfg.rollout.temperature) == (1e-6, 0, 8, 1.0)
    assert (cfg.eps_low, cfg.eps_high, cfg.dynamic_sampling, cfg.aggregation, cfg.kl_coef) == (
        0.2,
        0.28,
        True,
        "token",
        0.0,
    )


def test_eval_recipe_runs_with_its_protocol(family_models, tmp_path):
    recipe = RECIPES / "eval.yaml"
    written = load_config(recipe, model=EvalRunConfig)
    assert written.benchmarks == ["math500", "aime24", "aime25"]
    out = tmp_path / "eval"
    benchmarks = [str(FIXTURES / "math500_sample.jsonl"), str(FIXTURES / "aime_sample.jsonl")]
    overrides = [
        f"model.path={family_models[FAMILY[written.model.path]]}",
        f"benchmarks={json.dumps(benchmarks)}",
        f"output_dir={out}",
        "limit=2",
        "sampling.max_new_tokens=8",
    ]
    assert_only_overridden(written, load_config(recipe, overrides, EvalRunConfig), overrides)

    cli.main(["eval", "--config", str(recipe), *overrides])

    for name in ("math500_sample", "aime_sample"):
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["k"] == 8 and summary["num_samples"] == 2 * 8
        assert {k: summary["sampling"][k] for k in ("temperature", "top_p", "top_k")} == {
            "temperature": 0.6,
            "top_p": 0.95,
            "top_k": 20,
        }
        assert summary["grader"].startswith("math-verify") and summary["prompt_template"] == "dapo"
        assert len((out / name / "samples.jsonl").read_text().splitlines()) == 16


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_recipe_names_an_accelerate_config_that_agrees_on_precision(recipe):
    """Each recipe's launch line names a file in configs/accelerate/ that accelerate reads, whose
    precision is the recipe's (crisp refuses to start when they differ)."""
    from accelerate.commands.config.config_args import load_config_from_file

    (launcher,) = {word for word in recipe.read_text().split() if word.startswith("configs/accelerate/")}
    accelerate_cfg = load_config_from_file(str(ROOT / launcher))
    data = yaml.safe_load(recipe.read_text())
    assert accelerate_cfg.mixed_precision == data["mixed_precision"] == "bf16"
    assert accelerate_cfg.distributed_type.value in ("MULTI_GPU", "FSDP")
    if accelerate_cfg.distributed_type.value == "FSDP":
        assert accelerate_cfg.fsdp_config["fsdp_version"] == 2
        assert accelerate_cfg.fsdp_config["fsdp_reshard_after_forward"] is True  # full shard
        assert "lora" not in data["model"]  # LoRA runs under DDP
        assert data.get("save_every", 0) == 0 and data.get("resume", "none") == "none"  # no FSDP checkpoints yet
