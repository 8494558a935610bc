"""`crisp compare`: run names, the table against a baseline, setting checks, the Pareto front."""

from __future__ import annotations

import json

import pytest

from crisp.cli import main
from crisp.report import anatomy_lines, comparison_lines, load_rows, pareto_front, setting_differences


def summary(accuracy, tokens, levels, **settings):
    by = {lv: {"accuracy": a, "mean_tokens": t} for lv, (a, t) in levels.items()}
    return {
        "accuracy": accuracy,
        "mean_tokens": tokens,
        "accuracy_std_over_samples": 0.01,
        "by_difficulty": by,
        "k": 4,
        "sampling": {"n": 4, "temperature": 0.6},
        "grader": "exact",
        **settings,
    }


@pytest.fixture()
def runs(tmp_path):
    rows = {
        "base/eval": summary(0.5, 100.0, {"1": (0.8, 50.0), "2": (0.2, 150.0)}),
        "siri/eval": summary(0.6, 50.0, {"1": (0.9, 25.0), "2": (0.3, 75.0)}),
        "demo/eval/crisp": summary(0.4, 80.0, {"1": (0.8, 40.0), "2": (0.0, 120.0)}, k=8),
    }
    for name, row in rows.items():
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "summary.json").write_text(json.dumps(row))
    return tmp_path


def test_names_ratios_and_differences(runs):
    rows = load_rows([str(runs / "base"), str(runs / "siri" / "eval"), str(runs / "demo")])
    assert list(rows) == ["base/eval", "siri/eval", "crisp"]
    lines = comparison_lines(rows, baseline="base/eval")
    assert lines[0] == ["run", "level", "accuracy", "tokens", "reduction", "dAcc/CR"]
    assert lines[1][4:] == ["-", "-"]  # the baseline against itself
    siri = lines[4]
    assert siri[:2] == ["siri/eval", "all"] and siri[4] == "50.0%"
    assert siri[5] == f"{(0.6 / 0.5 - 1) / 0.5:.3f}"  # dAcc / CR = 0.2 / 0.5
    assert lines[5][1:] == ["L1", "0.900", "25.0", "50.0%", f"{(0.9 / 0.8 - 1) / 0.5:.3f}"]
    assert [n.split(" ")[0] for n in setting_differences(rows)] == ["k"]
    assert pareto_front(rows) == ["siri/eval"]


def test_compare_cli_writes_the_report(runs, tmp_path, capsys):
    main(
        [
            "compare",
            str(runs / "base"),
            str(runs / "siri"),
            "--out",
            str(tmp_path / "report"),
            "--baseline",
            "siri/eval",
        ]
    )
    out = capsys.readouterr().out
    assert "reduction and dAcc/CR against siri/eval" in out
    for name in ("report.md", "pareto.png", "per_difficulty.png"):
        assert (tmp_path / "report" / name).is_file()
    with pytest.raises(SystemExit):
        main(["compare", str(runs / "base"), "--baseline", "nope"])


def test_rows_in_both_modes_get_a_mode_column_and_a_missing_mode_is_reported():
    rows = {
        "base": summary(0.5, 100.0, {"1": (0.5, 100.0)}, model="base", thinking_mode="thinking"),
        "base (thinking-free)": summary(0.3, 20.0, {"1": (0.3, 20.0)}, model="base", thinking_mode="thinking_free"),
        "tfpi": summary(0.6, 60.0, {"1": (0.6, 60.0)}, model="tfpi", thinking_mode="thinking"),
        "crisp": summary(0.5, 40.0, {"1": (0.5, 40.0)}, model="crisp", thinking_mode="thinking"),
    }
    lines = comparison_lines(rows, baseline="base")
    assert lines[0] == ["run", "mode", "level", "accuracy", "tokens", "reduction", "dAcc/CR"]
    assert [line[:3] for line in lines[1:5]] == [
        ["base", "thinking", "all"],
        ["", "", "L1"],
        ["base (thinking-free)", "thinking_free", "all"],
        ["", "", "L1"],
    ]
    assert lines[3][5] == "80.0%"  # against the baseline row, whatever its mode
    assert setting_differences(rows) == [
        "thinking_mode: tfpi has no thinking_free row",
        "thinking_mode: crisp has no thinking_free row",
    ]
    one_mode = {name: rows[name] for name in ("base", "tfpi")}
    assert "mode" not in comparison_lines(one_mode, baseline="base")[0] and not setting_differences(one_mode)


def anatomy(thinking, answer, loops, rates):
    return {
        "mean_thinking_tokens": thinking,
        "mean_answer_tokens": answer,
        "loop_rate": loops,
        "truncation_rate": 0.25,
        "markers_per_1k_tokens": sum(rates.values()),
        "marker_rates_per_1k_tokens": rates,
    }


def test_anatomy_table_and_figure(tmp_path, capsys):
    base = summary(0.5, 100.0, {"1": (0.8, 50.0)}, anatomy={"markers": ["wait", "hmm"]})
    base.update(anatomy(90.0, 10.0, 0.1, {"wait": 12.0, "hmm": 3.5}))
    base["by_difficulty"]["1"].update(anatomy(45.0, 5.0, 0.0, {"wait": 8.0, "hmm": 0.0}))
    crisp = summary(0.5, 40.0, {"1": (0.8, 20.0)}, anatomy={"markers": ["wait", "hmm"]})
    crisp.update(anatomy(30.0, 10.0, 0.0, {"wait": 1.25, "hmm": 0.0}))
    old = summary(0.4, 60.0, {})  # evaluated before the anatomy existed
    rows = {"base": base, "crisp": crisp, "old": old}
    lines = anatomy_lines(rows)
    assert lines[0] == ["run", "level", "thinking", "answer", "loops", "truncated", "markers/1k", "wait", "hmm"]
    assert lines[1] == ["base", "all", "90.0", "10.0", "10.0%", "25.0%", "15.50", "12.00", "3.50"]
    assert lines[2] == ["", "L1", "45.0", "5.0", "0.0%", "25.0%", "8.00", "8.00", "0.00"]
    assert lines[3][:3] == ["crisp", "all", "30.0"] and lines[3][-2:] == ["1.25", "0.00"]
    assert lines[4] == ["", "L1"] + ["-"] * 7  # a level without anatomy figures
    assert lines[5] == ["old", "all"] + ["-"] * 7
    assert any(note.startswith("anatomy differs") for note in setting_differences(rows))
    for name, row in rows.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(row))
    main(["compare", *(str(tmp_path / name) for name in rows), "--out", str(tmp_path / "report")])
    assert "reasoning anatomy" in capsys.readouterr().out
    report = (tmp_path / "report" / "report.md").read_text()
    assert "![reasoning anatomy](anatomy.png)" in report and "| base | all | 90.0 | 10.0 |" in report
    assert (tmp_path / "report" / "anatomy.png").stat().st_size > 10_000
    main(["compare", str(tmp_path / "old"), "--out", str(tmp_path / "plain")])  # no anatomy: no figure
    assert not (tmp_path / "plain" / "anatomy.png").exists()
    assert "anatomy" not in (tmp_path / "plain" / "report.md").read_text()
