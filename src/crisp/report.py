"""Compare evaluated runs: one table, a Pareto plot (accuracy vs tokens), a per-difficulty plot,
and the reasoning anatomy (a table and a figure).

The table has a line per run and per difficulty level: accuracy (avg@k), mean response tokens, the
token reduction against the baseline run and SIRI's dAcc/CR (dAcc = max(acc/acc_base - 1, 0),
CR = tokens/tokens_base). The anatomy table has the same lines: mean thinking and answer tokens,
the share of responses with a repetition loop, the truncation rate, and the marker rates per 1,000
response tokens (crisp.anatomy). Runs are only comparable when they were evaluated alike, so
differing evaluation settings (k, sampler, grader, prompt template, benchmark, anatomy rules) are
reported with the table. Rows in different prompt modes (thinking, thinking-free) get a mode column,
and a model evaluated in fewer modes than the others is reported too.
"""

from __future__ import annotations

import json
from pathlib import Path

from crisp.config import ConfigError
from crisp.evaluate import compare_to_baseline, level_key


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend, imported when a figure is drawn (printing a
    table leaves matplotlib alone)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_front(rows: dict[str, dict]) -> list[str]:
    """The runs that no other run beats on both accuracy and tokens, from the shortest up."""
    front, best = [], float("-inf")
    for name in sorted(rows, key=lambda n: (rows[n]["mean_tokens"], -rows[n]["accuracy"])):
        if rows[name]["accuracy"] > best:
            front.append(name)
            best = rows[name]["accuracy"]
    return front


def pareto_plot(rows: dict[str, dict], path: str | Path, *, title: str = "Accuracy vs response length") -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, s in rows.items():
        ax.errorbar(
            s["mean_tokens"],
            s["accuracy"],
            yerr=s.get("accuracy_std_over_samples") or 0,
            fmt="o",
            capsize=3,
            markersize=7,
            label=name,
        )
        ax.annotate(name, (s["mean_tokens"], s["accuracy"]), textcoords="offset points", xytext=(6, 6))
    frontier = pareto_front(rows)
    ax.step(
        [rows[n]["mean_tokens"] for n in frontier],
        [rows[n]["accuracy"] for n in frontier],
        where="post",
        color="gray",
        linestyle="--",
        linewidth=1,
        label="Pareto front",
    )
    ax.set_xlabel("mean response tokens")
    ax.set_ylabel("accuracy (avg@k)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def difficulty_plot(rows: dict[str, dict], path: str | Path, *, baseline: str) -> None:
    """Left: token reduction vs the baseline per level. Right: accuracy per level."""
    plt = _pyplot()
    levels = levels_of(rows)
    others = [n for n in rows if n != baseline]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / max(1, len(others))
    base = rows[baseline].get("by_difficulty", {})
    colors = {name: f"C{i}" for i, name in enumerate(rows)}  # the same colour for a run in both panels
    for i, name in enumerate(others):
        by = rows[name].get("by_difficulty", {})
        shared = [j for j, lv in enumerate(levels) if lv in by and lv in base and base[lv]["mean_tokens"]]
        reduction = [100 * (1 - by[levels[j]]["mean_tokens"] / base[levels[j]]["mean_tokens"]) for j in shared]
        left.bar([j + i * width for j in shared], reduction, width, label=name, color=colors[name])
    left.set_xticks([j + width * (len(others) - 1) / 2 for j in range(len(levels))], [f"L{lv}" for lv in levels])
    left.set_ylabel(f"token reduction vs {baseline} (%)")
    left.set_xlabel("difficulty")
    left.set_title("Compression per difficulty")
    left.legend(fontsize=8)
    left.grid(axis="y", alpha=0.3)
    for name, s in rows.items():
        by = s.get("by_difficulty", {})
        right.plot(
            [f"L{lv}" for lv in levels if lv in by],
            [by[lv]["accuracy"] for lv in levels if lv in by],
            marker="o",
            label=name,
            color=colors[name],
        )
    right.set_ylabel("accuracy (avg@k)")
    right.set_xlabel("difficulty")
    right.set_title("Accuracy per difficulty")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def anatomy_plot(rows: dict[str, dict], path: str | Path) -> None:
    """Left: each marker's rate per 1,000 response tokens, a bar per run. Right: mean thinking and
    answer tokens per run, stacked, with the share of responses in a repetition loop beside."""
    plt = _pyplot()
    measured = {name: s for name, s in rows.items() if "mean_thinking_tokens" in s}
    markers, names = _markers(measured), list(measured)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2 + 0.2 * len(names)), gridspec_kw={"width_ratios": [2, 1]})
    colors = {name: f"C{i}" for i, name in enumerate(rows)}  # a run's colour in the other figures too
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        rates = measured[name]["marker_rates_per_1k_tokens"]
        left.bar(
            [j + i * width for j in range(len(markers))],
            [rates.get(m, 0) for m in markers],
            width,
            label=name,
            color=colors[name],
        )
    left.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(markers))], markers, rotation=30, ha="right")
    left.set_ylabel("per 1,000 response tokens")
    left.set_title("Hesitation and self-verification markers")
    left.grid(axis="y", alpha=0.3)
    rows_at = list(range(len(names)))[::-1]  # the first run on top
    thinking = [measured[n]["mean_thinking_tokens"] for n in names]
    answer = [measured[n]["mean_answer_tokens"] for n in names]
    right.barh(rows_at, thinking, color=[colors[n] for n in names])
    right.barh(rows_at, answer, left=thinking, color=[colors[n] for n in names], alpha=0.4, hatch="//")
    for y, n, t, a in zip(rows_at, names, thinking, answer):
        right.annotate(
            f"loops {measured[n]['loop_rate']:.0%}",
            (t + a, y),
            va="center",
            fontsize=8,
            textcoords="offset points",
            xytext=(3, 0),
        )
    right.set_yticks(rows_at, [f"run {i + 1}" for i in range(len(names))])
    right.set_xlabel("mean tokens per response")
    right.set_title("Thinking (solid) and answer (hatched)")
    right.margins(x=0.25)
    right.grid(axis="x", alpha=0.3)
    handles, _ = left.get_legend_handles_labels()
    fig.legend(
        handles,
        [f"run {i + 1}: {n}" for i, n in enumerate(names)],
        loc="upper center",
        ncol=min(len(names), 3),
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.07 * -(-len(names) // 3)))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def has_anatomy(rows: dict[str, dict]) -> bool:
    return any("mean_thinking_tokens" in s for s in rows.values())


def _levels(summary: dict) -> list[str]:
    return levels_of({"": summary})


def levels_of(rows: dict[str, dict]) -> list[str]:
    """The difficulty levels any of the summaries has, in order."""
    return sorted({lv for s in rows.values() for lv in s.get("by_difficulty", {})}, key=level_key)


def thinking_mode(summary: dict) -> str:
    """The prompt mode a summary was evaluated in ("-" for summaries from before modes were recorded)."""
    return summary.get("thinking_mode") or "-"


def comparison_lines(rows: dict[str, dict], *, baseline: str) -> list[list[str]]:
    """Header + one line per run ("all") and per difficulty level of that run; a mode column when
    the runs were not all evaluated in the same prompt mode."""
    with_mode = len({thinking_mode(s) for s in rows.values()}) > 1
    lines = [["run", "level", "accuracy", "tokens", "reduction", "dAcc/CR"]]
    for name, s in rows.items():
        vs = compare_to_baseline(s, rows[baseline])
        scopes = [("all", s, vs["overall"])]
        scopes += [(f"L{lv}", s["by_difficulty"][lv], vs["by_difficulty"].get(lv)) for lv in _levels(s)]
        for level, figures, ratio in scopes:
            accuracy = f"{figures['accuracy']:.3f}"
            if level == "all" and figures.get("accuracy_std_over_samples"):
                accuracy += f" ± {figures['accuracy_std_over_samples']:.3f}"
            own = name == baseline or ratio is None
            reduction = "-" if own or ratio["token_reduction"] is None else f"{ratio['token_reduction']:.1%}"
            dacc_cr = "-" if own or ratio["dacc_over_cr"] is None else f"{ratio['dacc_over_cr']:.3f}"
            lines.append(
                [name if level == "all" else "", level, accuracy, f"{figures['mean_tokens']:.1f}", reduction, dacc_cr]
            )
            if with_mode:
                lines[-1].insert(1, thinking_mode(s) if level == "all" else "")
    if with_mode:
        lines[0].insert(1, "mode")
    return lines


def _markers(rows: dict[str, dict]) -> list[str]:
    """Every marker any run counted, in first-seen order."""
    return list(dict.fromkeys(m for s in rows.values() for m in s.get("marker_rates_per_1k_tokens", {})))


def anatomy_lines(rows: dict[str, dict]) -> list[list[str]]:
    """Header + one line per run ("all") and per level: the reasoning anatomy ("-" where not measured)."""
    markers = _markers(rows)
    lines = [["run", "level", "thinking", "answer", "loops", "truncated", "markers/1k"] + markers]
    for name, s in rows.items():
        for level, figures in [("all", s)] + [(f"L{lv}", s["by_difficulty"][lv]) for lv in _levels(s)]:
            if "mean_thinking_tokens" not in figures:
                cells = ["-"] * (5 + len(markers))
            else:
                rates = figures["marker_rates_per_1k_tokens"]
                cells = [
                    f"{figures['mean_thinking_tokens']:.1f}",
                    f"{figures['mean_answer_tokens']:.1f}",
                    f"{figures['loop_rate']:.1%}",
                    f"{figures.get('truncation_rate', 0):.1%}",
                    f"{figures['markers_per_1k_tokens']:.2f}",
                ]
                cells += [f"{rates[m]:.2f}" if m in rates else "-" for m in markers]
            lines.append([name if level == "all" else "", level] + cells)
    return lines


def comparison_table(rows: dict[str, dict], *, baseline: str, markdown: bool = False) -> str:
    """The comparison as aligned plain text, or as a Markdown table."""
    return format_lines(comparison_lines(rows, baseline=baseline), markdown=markdown)


def anatomy_table(rows: dict[str, dict], *, markdown: bool = False) -> str:
    return format_lines(anatomy_lines(rows), markdown=markdown)


def format_lines(lines: list[list[str]], *, markdown: bool = False, strip: bool = True) -> str:
    """A header line and rows of cells as a Markdown table, or as plain text in columns two spaces
    apart (every table crisp prints). `strip`: no trailing
    spaces on plain-text lines; without it every cell is padded to its column's width."""
    if markdown:
        out = ["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(lines[0])]
        return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines[1:]])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    aligned = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join(line.rstrip() if strip else line for line in aligned)


def format_table(rows: dict[str, dict], *, baseline: str | None = None) -> str:
    """A plain-text table: one row per named summary, accuracy and mean tokens per level."""
    levels = levels_of(rows)
    header = ["run", "acc", "tokens"] + [f"L{lv} acc/tok" for lv in levels] + (["reduction"] if baseline else [])
    lines = [header]
    for name, s in rows.items():
        cells = [str(name), f"{s['accuracy']:.3f}", f"{s['mean_tokens']:.1f}"]
        for lv in levels:
            d = s.get("by_difficulty", {}).get(lv)
            cells.append(f"{d['accuracy']:.2f}/{d['mean_tokens']:.0f}" if d else "-")
        if baseline:
            base = rows[baseline]["mean_tokens"]
            cells.append(f"{1 - s['mean_tokens'] / base:+.1%}" if name != baseline else "")
        lines.append(cells)
    return format_lines(lines, strip=False)  # every cell padded, as this table has always printed


SETTINGS = ("benchmark", "k", "sampling", "grader", "prompt_template", "instruction", "anatomy")


def setting_differences(rows: dict[str, dict]) -> list[str]:
    """One line per evaluation setting that is not the same for every run (n is k's copy: ignored)."""
    notes = []
    for key in SETTINGS:
        values = {}
        for name, s in rows.items():
            value = s.get(key)
            if key == "sampling" and isinstance(value, dict):
                value = {k: v for k, v in value.items() if k != "n"}
            values.setdefault(json.dumps(value, sort_keys=True), []).append(name)
        if len(values) > 1:
            notes.append(f"{key} differs: " + "; ".join(f"{', '.join(names)}: {v}" for v, names in values.items()))
    return notes + mode_gaps(rows)


def mode_gaps(rows: dict[str, dict]) -> list[str]:
    """Where the rows mix prompt modes: one line per model that lacks a mode another was evaluated in."""
    modes = {thinking_mode(s) for s in rows.values()}
    if len(modes) < 2:
        return []
    by_model: dict[str, set[str]] = {}
    for name, s in rows.items():
        by_model.setdefault(s.get("model") or name, set()).add(thinking_mode(s))
    return [
        f"thinking_mode: {model} has no {', '.join(sorted(modes - have))} row"
        for model, have in by_model.items()
        if modes - have
    ]


ANATOMY_NOTE = (
    "Thinking and answer are mean tokens per response (the thinking section runs to the end of "
    "the first `</think>`); loops: the share of responses in which some span of n words occurs k "
    "times (see `anatomy` in summary.json); markers: matches per 1,000 response tokens, "
    "case-insensitive, whole words."
)


def write_report(
    out: str | Path, rows: dict[str, dict], *, baseline: str = "base", title: str = "crisp report", notes: str = ""
) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pareto_plot(rows, out / "pareto.png")
    difficulty_plot(rows, out / "per_difficulty.png", baseline=baseline)
    anatomy = []  # the report's anatomy section, where the runs measured it
    if has_anatomy(rows):
        anatomy_plot(rows, out / "anatomy.png")
        anatomy = [
            "## Reasoning anatomy\n\n" + anatomy_table(rows, markdown=True),
            ANATOMY_NOTE,
            "![reasoning anatomy](anatomy.png)",
        ]
    any_row = next(iter(rows.values()))
    settings = (
        f"k = {any_row.get('k')} samples per problem, sampling {json.dumps(any_row.get('sampling'))}, "
        f"grader `{any_row.get('grader')}`, {any_row.get('num_problems')} problems."
    )
    text = "\n\n".join(
        part
        for part in [
            f"# {title}",
            comparison_table(rows, baseline=baseline, markdown=True),
            f"Reduction and dAcc/CR (dAcc = max(acc/acc_base - 1, 0), CR = tokens/tokens_base) are against "
            f"`{baseline}`. {settings}",
            "\n".join(f"**Not evaluated alike**: {note}" for note in setting_differences(rows)),
            "![accuracy vs tokens](pareto.png)",
            "![per difficulty](per_difficulty.png)",
            *anatomy,
            notes,
        ]
        if part
    )
    (out / "report.md").write_text(text.strip() + "\n")
    return out / "report.md"


def _summary_files(path: Path) -> list[Path]:
    """A file as given; a directory's own summary.json, else every summary.json below it."""
    if path.is_file():
        return [path]
    if (path / "summary.json").is_file():
        return [path / "summary.json"]
    return sorted(path.rglob("summary.json"))


def _run_names(directories: list[Path]) -> list[str]:
    """The shortest trailing part of each directory that tells the runs apart ("eval" keeps its parent)."""
    depth = [2 if d.name == "eval" else 1 for d in directories]
    while True:
        names = ["/".join(d.parts[-k:]) for d, k in zip(directories, depth)]
        clashes = {n for n in names if names.count(n) > 1}
        grow = [i for i, n in enumerate(names) if n in clashes and depth[i] < len(directories[i].parts)]
        if not grow:
            return names
        for i in grow:
            depth[i] += 1


def load_rows(paths: list[str]) -> dict[str, dict]:
    """Rows from run directories or summary files, in the order given. A file whose values are
    summaries (the demo's summary.json) contributes each of its rows under its own names."""
    entries: list[tuple[str | None, Path, dict]] = []  # (name, or None to name it by its directory)
    for item in paths:
        files = _summary_files(Path(item))
        if not files:
            raise FileNotFoundError(f"{item}: no summary.json found (run `crisp eval ... --out DIR` first)")
        for file in files:
            data = json.loads(file.read_text())
            if "accuracy" in data:
                entries.append((None, file, data))
            else:
                entries += [
                    (name, file, row) for name, row in data.items() if isinstance(row, dict) and "accuracy" in row
                ]
    by_directory = iter(_run_names([file.resolve().parent for name, file, _ in entries if name is None]))
    rows: dict[str, dict] = {}
    for name, file, summary in entries:
        name = name or next(by_directory)
        rows[name if name not in rows else f"{file}:{name}"] = summary
    return rows


def compare_runs(paths: list[str], *, out: str | None = None, baseline: str | None = None) -> dict[str, dict]:
    """Print the comparison table (the first run is the baseline unless named) and the anatomy table;
    with `out`, also write report.md, pareto.png, per_difficulty.png and anatomy.png there."""
    rows = load_rows(paths)
    baseline = baseline or next(iter(rows))
    if baseline not in rows:
        raise ConfigError(f"--baseline {baseline!r} is not one of the runs: {', '.join(rows)}")
    print(comparison_table(rows, baseline=baseline))
    print(f"\nreduction and dAcc/CR against {baseline}")
    if has_anatomy(rows):
        print("\nreasoning anatomy (mean tokens per response; markers per 1,000 response tokens)")
        print(anatomy_table(rows))
    for note in setting_differences(rows):
        print(f"warning: not evaluated alike: {note}")
    if out:
        write_report(out, rows, baseline=baseline, title="crisp compare")
        print(f"wrote {out}/report.md, pareto.png, per_difficulty.png" + (", anatomy.png" if has_anatomy(rows) else ""))
    return rows
