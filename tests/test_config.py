"""Run configurations: strict validation naming the key, key=value overrides, dump/load round trip,
and the CLI's exit code for a bad config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from crisp import cli
from crisp.config import ConfigError, EvalConfig, apply_overrides, dump_config, load_config, parse_override, validate
from crisp.methods.grpo import GRPOConfig
from crisp.methods.selfdistill import SelfDistillConfig
from crisp.methods.sft import SFTConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

BASE = {
    "method": "selfdistill",
    "output_dir": "runs/x",
    "max_steps": 3,
    "model": {"path": "some/model"},
}


def write(tmp_path: Path, data: dict, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def error_of(data: dict, overrides: list[str] | None = None, tmp_path: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        if tmp_path is None:
            validate(apply_overrides(data, overrides or []))
        else:
            load_config(write(tmp_path, data), overrides)
    return str(info.value)


def test_base_config_is_valid():
    cfg = validate(dict(BASE))
    assert isinstance(cfg, SelfDistillConfig)
    assert cfg.max_steps == 3 and cfg.model.path == "some/model"


# ---------------------------------------------------------------------------------------------
# errors name the key
# ---------------------------------------------------------------------------------------------


def test_unknown_top_level_key(tmp_path):
    message = error_of({**BASE, "max_stepz": 4}, tmp_path=tmp_path)
    assert "max_stepz" in message


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lrr=1e-5", "optim.lrr"),
        ("teacher.instructon=v2", "teacher.instructon"),
        ("rollout.temp=0.5", "rollout.temp"),
        ("model.tiny.hidden=8", "model.tiny.hidden"),
    ],
)
def test_unknown_nested_key(tmp_path, override, key):
    data = dict(BASE)
    if override.startswith("model.tiny"):
        data["model"] = {"tiny": {}}
    message = error_of(data, [override], tmp_path=tmp_path)
    assert key in message


def test_wrong_type_names_the_key(tmp_path):
    message = error_of(BASE, ["max_steps=abc"], tmp_path=tmp_path)
    assert message.split(":")[0] == "max_steps", message
    assert "integer" in message


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=0", "optim.lr"),
        ("optim.lr=-1e-5", "optim.lr"),
        ("teacher.refresh_every=-1", "teacher.refresh_every"),
        ("eval.k=0", "eval.k"),
        ("rollout.temperature=-0.1", "rollout.temperature"),
        ("teacher.ema_decay=1.5", "teacher.ema_decay"),
        ("batch_size=0", "batch_size"),
    ],
)
def test_out_of_range_values_name_the_key(override, key):
    message = error_of(dict(BASE), [override])
    assert message.split(":")[0] == key, message


def test_eval_config_rejects_k_below_one():
    with pytest.raises(ConfigError, match=r"\bk\b"):
        validate({"k": 0}, EvalConfig)
    assert validate({"k": 3}, EvalConfig).k == 3


def test_unknown_method():
    with pytest.raises(ConfigError, match="method") as info:
        validate({**BASE, "method": "ppo"})
    assert "selfdistill" in str(info.value) and "'ppo'" in str(info.value)
    with pytest.raises(ConfigError, match="method"):
        validate({k: v for k, v in BASE.items() if k != "method"})


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


@pytest.mark.parametrize("model", [{}, {"path": "a", "tiny": {}}])
def test_model_needs_exactly_one_source(model):
    message = error_of({**BASE, "model": model})
    assert message.startswith("model"), message
    assert "model.path" in message and "model.tiny" in message
    assert validate({**BASE, "model": {"tiny": {}}}).model.tiny.hidden_size > 0


def test_teacher_needs_some_context():
    message = error_of(dict(BASE), ["teacher.instruction=null"])
    assert message.startswith("teacher")
    cfg = validate(apply_overrides(dict(BASE), ["teacher.instruction=null", "teacher.reference_solution=true"]))
    assert cfg.teacher.instruction is None and cfg.teacher.reference_solution


def test_micro_batch_must_divide():
    with pytest.raises(ConfigError, match="micro_batch_size"):
        validate(apply_overrides(dict(BASE), ["batch_size=4", "micro_batch_size=3"]))


# ---------------------------------------------------------------------------------------------
# overrides
# ---------------------------------------------------------------------------------------------


def test_overrides_parse_yaml_types(tmp_path):
    path = write(tmp_path, BASE)
    cfg = load_config(
        path,
        [
            "optim.lr=1e-5",
            "teacher.instruction=null",
            "teacher.reference_solution=true",
            "max_steps=7",
            "data.levels=[1, 3]",
            "output_dir=runs/other",
            "prompt.template=plain",
        ],
    )
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1e-5
    assert cfg.teacher.instruction is None
    assert cfg.teacher.reference_solution is True
    assert cfg.max_steps == 7
    assert cfg.data.levels == [1, 3]
    assert cfg.output_dir == "runs/other"
    assert cfg.prompt.template == "plain"


def test_parse_override_values():
    assert parse_override("optim.lr=1.0e-5") == (["optim", "lr"], 1e-5)
    assert parse_override("max_steps=12") == (["max_steps"], 12)
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=") == (["a"], None)
    assert parse_override("a=b=c") == (["a"], "b=c")
    assert parse_override("x.y=true") == (["x", "y"], True)
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("optim.lr")


def test_nested_override_creates_sections():
    data = apply_overrides({"a": 1}, ["eval.sampling.max_new_tokens=16", "eval.k=2"])
    assert data == {"a": 1, "eval": {"sampling": {"max_new_tokens": 16}, "k": 2}}
    cfg = validate(apply_overrides(dict(BASE), ["eval.k=2", "eval.sampling.max_new_tokens=16"]))
    assert cfg.eval.k == 2 and cfg.eval.sampling.max_new_tokens == 16


def test_override_through_a_value_is_an_error():
    with pytest.raises(ConfigError, match="max_steps"):
        apply_overrides(dict(BASE), ["max_steps.x=1"])


def test_override_does_not_touch_the_file(tmp_path):
    path = write(tmp_path, BASE)
    before = path.read_text()
    load_config(path, ["optim.lr=1e-5"])
    assert path.read_text() == before
    assert load_config(path).optim.lr != 1e-5


# ---------------------------------------------------------------------------------------------
# dump / load round trip
# ---------------------------------------------------------------------------------------------


def _preset_paths() -> list[Path]:
    return sorted(p for p in CONFIGS.rglob("*.yaml") if "method" in yaml.safe_load(p.read_text()))


@pytest.mark.parametrize("path", _preset_paths(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_presets_load_and_round_trip(path, tmp_path):
    cfg = load_config(path)
    dump_config(cfg, tmp_path / "dumped.yaml")
    again = load_config(tmp_path / "dumped.yaml")
    assert type(again) is type(cfg)
    assert again == cfg


def test_round_trip_with_non_defaults(tmp_path):
    cfg = load_config(
        write(tmp_path, BASE),
        [
            "optim.lr=2.5e-5",
            "optim.betas=[0.8, 0.95]",
            "teacher.update=ema",
            "teacher.ema_decay=0.9",
            "loss.divergence=mixed",
            "loss.term_clip=null",
            "eval.k=4",
            "rollout.n=2",
            "batch_size=3",
            "micro_batch_size=2",
            "seed=9",
            "prompt.enable_thinking=false",
        ],
    )
    dump_config(cfg, tmp_path / "dumped.yaml")
    again = load_config(tmp_path / "dumped.yaml")
    assert again == cfg
    assert again.optim.betas == (0.8, 0.95) and again.prompt.enable_thinking is False
    sft = validate({**BASE, "method": "sft", "model": {"tiny": {"hidden_size": 16}}})
    assert isinstance(sft, SFTConfig)
    dump_config(sft, tmp_path / "sft.yaml")
    assert load_config(tmp_path / "sft.yaml") == sft


def test_grpo_round_trip(tmp_path):
    cfg = validate({**BASE, "method": "grpo", "group_size": 4, "schedule": {"l_min": 8, "l_max": 32}})
    assert isinstance(cfg, GRPOConfig)
    dump_config(cfg, tmp_path / "grpo.yaml")
    assert load_config(tmp_path / "grpo.yaml") == cfg


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, key", [("optim.lrr=1e-5", "optim.lrr"), ("max_steps=abc", "max_steps")])
def test_cli_train_bad_key_exits_2_naming_the_key(tmp_path, capsys, override, key):
    path = write(tmp_path, {**BASE, "output_dir": str(tmp_path / "run")})
    with pytest.raises(SystemExit) as info:
        cli.main(["train", str(path), override])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert key in err and "error" in err
    assert not (tmp_path / "run").exists()


def test_cli_train_bad_key_in_file_exits_2(tmp_path, capsys):
    path = write(tmp_path, {**BASE, "output_dir": str(tmp_path / "run"), "sampling": {"n": 2}})
    with pytest.raises(SystemExit) as info:
        cli.main(["train", str(path)])
    assert info.value.code == 2
    assert "sampling" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # the run directory is the first thing training makes


def test_cli_train_missing_config_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", str(tmp_path / "missing.yaml")])
    assert info.value.code == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_cli_train_good_config_reaches_training(tmp_path, tiny_model_dir, capsys):
    """The counterpart of the tests above: a valid config does train (zero steps: the run opens,
    loads the model with the overrides applied, and saves it)."""
    data = {
        **BASE,
        "output_dir": str(tmp_path / "run"),
        "max_steps": 0,
        "model": {"path": str(tiny_model_dir)},
        "data": {"size": 8},
        "prompt": {"template": "plain"},
    }
    cli.main(["train", str(write(tmp_path, data)), "optim.lr=1e-5"])
    assert load_config(tmp_path / "run" / "config.yaml").optim.lr == 1e-5
    assert f"model saved to {tmp_path / 'run' / 'model'}" in capsys.readouterr().out
    assert (tmp_path / "run" / "model" / "config.json").is_file()


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["optim.lr=0"], "optim.lr"),
        (["optim.lr=-3e-4"], "optim.lr"),
        (["method=grpo", "eps_low=0.3", "eps_high=0.2"], "eps_high"),
        (["method=grpo", "schedule.l_min=4096", "schedule.l_max=2048"], "schedule.l_max"),
        (["teacher.refresh_every=-1"], "teacher.refresh_every"),  # M < 0
        (["eval.k=0"], "eval.k"),
        (["keep_checkpoints=0"], "keep_checkpoints"),
        (["max_skipped_steps=0"], "max_skipped_steps"),
        (["optim.lrr=1e-5"], "optim.lrr"),
        (["max_steps=ten"], "max_steps"),
    ],
    ids=[
        "lr-zero",
        "lr-negative",
        "eps-high-below-low",
        "l-min-above-l-max",
        "m-negative",
        "k-zero",
        "keep-zero",
        "max-skipped-zero",
        "unknown-key",
        "wrong-type",
    ],
)
def test_cli_train_rejects_each_bad_value_before_any_compute(tmp_path, capsys, overrides, key):
    """Every bad value the reliability issue lists: exit code 2, the key first in the message,
    no training started and no run directory created."""
    path = write(tmp_path, {**BASE, "output_dir": str(tmp_path / "run")})
    with pytest.raises(SystemExit) as info:
        cli.main(["train", str(path), *overrides])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"crisp: error: {key}"), err
    assert not (tmp_path / "run").exists()
