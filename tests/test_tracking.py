"""Experiment trackers (`report_to`): names checked before any compute, tensorboard's event files read
back (the scalars of metrics.jsonl at their steps, for SFT, self-distillation and `crisp eval`), a
resumed run continuing the same curves without a gap or a duplicate, and wandb in offline mode."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import eval_argv, read_metrics
from test_selfdistill import make_cfg as selfdistill_cfg
from test_sft import make_cfg as sft_cfg

from crisp.cli import main
from crisp.config import ConfigError, validate
from crisp.driver import train
from crisp.tracking import _wandb_run_id, hyperparameters

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the run's tensorboard directory: [(step, value)] as a reader sees them."""
    reader = event_accumulator.EventAccumulator(
        str(run_dir / "trackers" / "crisp"), size_guidance={event_accumulator.SCALARS: 0}
    )
    reader.Reload()
    return {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}


def assert_curves_are_the_metrics(run_dir: Path, tags: list[str]) -> None:
    """Each tag has exactly the steps and values of metrics.jsonl (float32 in the event files)."""
    curves = scalars(run_dir)
    for tag in tags:
        expected = [(m["step"], m[tag]) for m in read_metrics(run_dir) if m.get(tag) is not None]
        assert [step for step, _ in curves[tag]] == [step for step, _ in expected], tag
        assert [value for _, value in curves[tag]] == pytest.approx([float(v) for _, v in expected], rel=1e-5, abs=1e-6)


def test_unknown_tracker_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"report_to.*unknown tracker 'tensorbored'"):
        validate(
            {"method": "sft", "output_dir": "o", "max_steps": 1, "model": {"tiny": {}}, "report_to": ["tensorbored"]}
        )
    cfg = validate(
        {
            "method": "sft",
            "output_dir": "o",
            "max_steps": 1,
            "model": {"tiny": {}},
            "report_to": ["tensorboard", "tensorboard"],
        }
    )
    assert (
        cfg.report_to == ["tensorboard"]
        and validate({"method": "sft", "output_dir": "o", "max_steps": 1, "model": {"tiny": {}}}).report_to == []
    )


def test_a_tracker_not_installed_stops_before_any_compute(tmp_path, monkeypatch, capsys):
    from accelerate.utils import imports

    monkeypatch.setattr(imports, "is_mlflow_available", lambda: False)
    config = tmp_path / "sft.yaml"
    out = tmp_path / "run"
    config.write_text(
        yaml.safe_dump(
            {"method": "sft", "output_dir": str(out), "max_steps": 1, "model": {"tiny": {}}, "report_to": ["mlflow"]}
        )
    )
    with pytest.raises(SystemExit) as info:
        main(["train", str(config)])
    assert info.value.code == 2
    assert "report_to: mlflow is not installed; pip install mlflow" in capsys.readouterr().err
    assert not out.exists()  # nothing was written, let alone built
    with pytest.raises(SystemExit):  # crisp eval: the tracker is named before the (missing) model is looked for
        main(eval_argv(tmp_path / "no-model", out, "--benchmark synthetic --report-to mlflow"))
    assert "pip install mlflow" in capsys.readouterr().err


def test_hyperparameters_are_flat_scalars():
    flat = hyperparameters({"a": 1, "b": {"c": "x", "d": {"e": 0.5}}, "f": [1, 2], "g": None, "h": True})
    assert flat == {"a": 1, "b.c": "x", "b.d.e": 0.5, "f": "[1, 2]", "g": "null", "h": True}


def test_sft_logs_every_metric_to_tensorboard_at_its_step(tmp_path):
    out = tmp_path / "sft"
    train(sft_cfg(out, max_steps=3, report_to=["tensorboard"]))
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]  # metrics.jsonl is still written
    assert_curves_are_the_metrics(out, ["train/loss", "train/grad_norm", "train/lr", "time/forward_backward"])
    (hparams,) = (out / "trackers" / "crisp").glob("*/hparams.yml")  # the resolved config, flattened
    logged = yaml.safe_load(hparams.read_text())
    assert logged["max_steps"] == 3 and logged["optim.lr"] == 3e-3 and logged["report_to"] == '["tensorboard"]'


def test_selfdistill_logs_training_and_eval_metrics_to_tensorboard(tiny_model_dir, tmp_path):
    out = tmp_path / "selfdistill"
    train(
        selfdistill_cfg(
            tiny_model_dir,
            out,
            report_to=["tensorboard"],
            **{"eval.benchmark": "synthetic", "eval.limit": 3, "eval.sampling.max_new_tokens": 6},
        )
    )
    assert_curves_are_the_metrics(out, ["train/loss", "rollout/mean_tokens", "teacher/refreshed"])
    assert_curves_are_the_metrics(out, ["eval/accuracy", "eval/mean_thinking_tokens", "eval/loop_rate"])
    assert [step for step, _ in scalars(out)["eval/accuracy"]] == [2]


def test_a_resumed_run_continues_the_same_curves_without_gap_or_duplicate(tmp_path):
    """Run 4 steps (checkpoints at 2 and 4), lose checkpoint 4 as a crash after step 4 was logged
    would, resume from 2 to 6: the event files hold steps 3 and 4 twice, and the reader keeps one
    value per step, the resumed run's (metrics.jsonl's)."""
    out = tmp_path / "sft"
    train(sft_cfg(out, max_steps=4, save_every=2, report_to=["tensorboard"]))
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    train(sft_cfg(out, max_steps=6, save_every=2, resume="auto", report_to=["tensorboard"]))
    assert len(list((out / "trackers" / "crisp").glob("events.out.tfevents.*"))) == 2  # one directory, two writers
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert [step for step, _ in scalars(out)["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert_curves_are_the_metrics(out, ["train/loss", "train/tokens_per_s", "time/forward_backward"])


def test_cli_eval_logs_each_benchmark_to_tensorboard_and_metrics_jsonl(tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    argv = eval_argv(tiny_model_dir, out, "--benchmark synthetic --limit 4 --max-new-tokens 6 --report-to tensorboard")
    main(argv)
    main(argv)  # a second evaluation replaces the first one's metrics.jsonl
    summary = json.loads((out / "summary.json").read_text())
    (record,) = read_metrics(out)
    assert record["step"] == 0 and record["eval/synthetic/accuracy"] == pytest.approx(summary["accuracy"])
    assert record["eval/synthetic/markers_per_1k_tokens/but_wait"] == pytest.approx(
        summary["marker_rates_per_1k_tokens"]["but wait"]
    )
    curves = scalars(out)  # the second evaluation's value only: it rewound the event files to step 0
    assert curves["eval/synthetic/mean_tokens"] == [(0, pytest.approx(summary["mean_tokens"]))]
    assert "eval/synthetic/L1_accuracy" in curves


def test_wandb_run_id_is_kept_for_a_resume_and_new_for_a_fresh_run(tmp_path):
    first = _wandb_run_id(tmp_path, resuming=False)
    assert (tmp_path / "wandb_run_id").read_text().strip() == first
    assert _wandb_run_id(tmp_path, resuming=True) == first
    assert _wandb_run_id(tmp_path, resuming=False) != first
    assert _wandb_run_id(tmp_path / "new", resuming=True) != first  # nothing to resume: a new run


@pytest.mark.slow  # importing wandb next to torch and transformers takes 10-30 s on a busy 2-core box
def test_wandb_offline_resumes_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name, value in [
        ("WANDB_MODE", "offline"),
        ("WANDB_SILENT", "true"),
        ("WANDB_X_DISABLE_STATS", "true"),
        ("WANDB_X_DISABLE_MACHINE_INFO", "true"),
    ]:
        monkeypatch.setenv(name, value)
    out = tmp_path / "sft"
    train(sft_cfg(out, max_steps=2, save_every=2, report_to=["wandb"]))
    run_id = (out / "trackers" / "wandb_run_id").read_text().strip()
    train(sft_cfg(out, max_steps=4, save_every=2, resume="auto", report_to=["wandb"]))
    assert (out / "trackers" / "wandb_run_id").read_text().strip() == run_id
    runs = sorted((out / "trackers" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(run.name.endswith(run_id) for run in runs)  # `wandb sync` joins them
    for run in runs:  # each offline record file holds the logged metrics
        assert b"train/loss" in (run / f"run-{run_id}.wandb").read_bytes()
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]
