"""`crisp demo --methods tfpi` end to end, mechanically: the shipped demo configs, shrunk to a few
steps and tokens, train a base model and TFPI on it and evaluate base and TFPI in both modes."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from conftest import TINY

from crisp import cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# what each demo file must shrink to run in seconds; everything else is as shipped
SHRINK = {
    "base.yaml": {
        "max_steps": 2,
        "threads": 1,
        "model": {"tiny": {"architecture": "qwen3", **TINY}},
        "data": {"source": "synthetic", "size": 200, "levels": [1, 2]},
        "batch_tokens": 512,
    },
    "eval.yaml": {"k": 1, "sampling": {"n": 1, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 6}},
    "tfpi.yaml": {
        "max_steps": 3,
        "data": {"source": "synthetic", "size": 64},
        "batch_size": 2,
        "group_size": 4,
        "micro_batch_size": 8,
    },
}
TFPI_STAGES = [{"max_length": 2, "steps": 1}, {"max_length": 4, "steps": 1}, {"max_length": 6, "steps": 1}]


def shrunk_configs(directory: Path) -> Path:
    (directory / "demo").mkdir(parents=True)
    for name, changes in SHRINK.items():
        data = {**yaml.safe_load((CONFIGS / "demo" / name).read_text()), **changes}
        if name == "tfpi.yaml":
            shipped = data["schedule"]["stages"]
            assert [s["max_length"] for s in shipped] == sorted(s["max_length"] for s in shipped)  # growing
            data["schedule"] = {"kind": "stages", "stages": TFPI_STAGES}
        (directory / "demo" / name).write_text(yaml.safe_dump(data))
    return directory


def test_tfpi_demo_runs_and_evaluates_base_and_tfpi_in_both_modes(tmp_path, capsys):
    shipped = yaml.safe_load((CONFIGS / "demo" / "tfpi.yaml").read_text())
    siri = yaml.safe_load((CONFIGS / "demo" / "siri.yaml").read_text())
    budget = lambda c: c["max_steps"] * c["batch_size"] * c["group_size"]  # noqa: E731
    assert shipped["prompt"]["thinking_free"] and budget(shipped) == budget(siri)  # SIRI's rollout budget
    assert sum(s["steps"] for s in shipped["schedule"]["stages"]) == shipped["max_steps"]

    out = tmp_path / "demo"
    cli.main(["demo", "--out", str(out), "--methods", "tfpi", "--configs", str(shrunk_configs(tmp_path / "configs"))])

    rows = json.loads((out / "summary.json").read_text())
    assert list(rows) == [
        "base",
        "base (thinking-free)",
        "prompt_only_v1",
        "prompt_only_v2",
        "tfpi",
        "tfpi (thinking-free)",
    ]
    modes = {name: row["thinking_mode"] for name, row in rows.items()}
    assert modes == {
        "base": "thinking",
        "base (thinking-free)": "thinking_free",
        "prompt_only_v1": "thinking",
        "prompt_only_v2": "thinking",
        "tfpi": "thinking",
        "tfpi (thinking-free)": "thinking_free",
    }
    assert rows["tfpi"]["model"] == rows["tfpi (thinking-free)"]["model"] == str(out / "tfpi" / "model")
    metrics = [json.loads(line) for line in (out / "tfpi" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["rollout/stage"], m["rollout/max_len"], m["rollout/thinking_free"]) for m in metrics] == [
        (1, 2, True),
        (2, 4, True),
        (3, 6, True),
    ]
    report = (out / "report.md").read_text()
    assert "| run | mode | level |" in report and "| tfpi (thinking-free) | thinking_free | all |" in report
    assert "(thinking-free)" in capsys.readouterr().out
