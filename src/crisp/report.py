"""Compare evaluated runs: a table, a Pareto plot (accuracy vs tokens), a per-difficulty plot."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from crisp.evaluate import _level_key, compare_to_baseline, format_table  # noqa: E402


def pareto_plot(rows: dict[str, dict], path: str | Path, *, title: str = "Accuracy vs response length") -> None:
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, s in rows.items():
        ax.errorbar(s["mean_tokens"], s["accuracy"], yerr=s.get("accuracy_std_over_samples") or 0,
                    fmt="o", capsize=3, markersize=7, label=name)
        ax.annotate(name, (s["mean_tokens"], s["accuracy"]), textcoords="offset points", xytext=(6, 6))
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
    levels = sorted({lv for s in rows.values() for lv in s.get("by_difficulty", {})}, key=_level_key)
    others = [n for n in rows if n != baseline]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / max(1, len(others))
    base = rows[baseline]["by_difficulty"]
    for i, name in enumerate(others):
        by = rows[name]["by_difficulty"]
        reduction = [100 * (1 - by[lv]["mean_tokens"] / base[lv]["mean_tokens"]) for lv in levels]
        left.bar([j + i * width for j in range(len(levels))], reduction, width, label=name)
    left.set_xticks([j + width * (len(others) - 1) / 2 for j in range(len(levels))], [f"L{lv}" for lv in levels])
    left.set_ylabel(f"token reduction vs {baseline} (%)")
    left.set_xlabel("difficulty")
    left.set_title("Compression per difficulty")
    left.legend(fontsize=8)
    left.grid(axis="y", alpha=0.3)
    for name, s in rows.items():
        right.plot([f"L{lv}" for lv in levels], [s["by_difficulty"][lv]["accuracy"] for lv in levels],
                   marker="o", label=name)
    right.set_ylabel("accuracy (avg@k)")
    right.set_xlabel("difficulty")
    right.set_title("Accuracy per difficulty")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(rows: dict[str, dict], *, baseline: str) -> str:
    levels = sorted({lv for s in rows.values() for lv in s.get("by_difficulty", {})}, key=_level_key)
    head = ["run", "accuracy", "± (std over k)", "mean tokens", "reduction", "dAcc/CR"]
    head += [f"L{lv} acc / tokens" for lv in levels]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in rows.items():
        vs = compare_to_baseline(s, rows[baseline])["overall"]
        cells = [name, f"{s['accuracy']:.3f}", f"{s.get('accuracy_std_over_samples', 0):.3f}",
                 f"{s['mean_tokens']:.1f}", f"{vs['token_reduction']:.1%}", f"{vs['dacc_over_cr']:.3f}"]
        for lv in levels:
            d = s["by_difficulty"].get(lv)
            cells.append(f"{d['accuracy']:.3f} / {d['mean_tokens']:.1f}" if d else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out: str | Path, rows: dict[str, dict], *, baseline: str = "base", title: str = "crisp report",
                 notes: str = "") -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pareto_plot(rows, out / "pareto.png")
    difficulty_plot(rows, out / "per_difficulty.png", baseline=baseline)
    any_row = next(iter(rows.values()))
    settings = (f"k = {any_row.get('k')} samples per problem, sampling {json.dumps(any_row.get('sampling'))}, "
                f"grader `{any_row.get('grader')}`, {any_row.get('num_problems')} problems.")
    text = "\n\n".join([
        f"# {title}",
        markdown_table(rows, baseline=baseline),
        f"Reduction and dAcc/CR are against `{baseline}`. {settings}",
        "![accuracy vs tokens](pareto.png)",
        "![per difficulty](per_difficulty.png)",
        notes,
    ])
    (out / "report.md").write_text(text.strip() + "\n")
    return out / "report.md"


def load_rows(paths: list[str]) -> dict[str, dict]:
    """Rows from run directories or summary files. A file whose values are summaries (the demo's)
    contributes each of its rows; a run directory is searched for summary.json files."""
    rows: dict[str, dict] = {}
    for item in paths:
        path = Path(item)
        files = [path] if path.is_file() else sorted(path.rglob("summary.json"))
        if not files:
            raise FileNotFoundError(f"{item}: no summary.json found (run `crisp eval ... --out DIR` first)")
        for file in files:
            data = json.loads(file.read_text())
            if "accuracy" in data:
                name = file.parent.name if file.parent != path.parent or path.is_dir() else file.stem
                rows[name if name not in rows else str(file.parent)] = data
            else:
                rows.update({k: v for k, v in data.items() if isinstance(v, dict) and "accuracy" in v})
    return rows


def compare_runs(paths: list[str], *, out: str | None = None) -> None:
    rows = load_rows(paths)
    baseline = next(iter(rows))
    print(format_table(rows, baseline=baseline))
    if out:
        write_report(out, rows, baseline=baseline, title="crisp compare")
        print(f"wrote {out}/report.md, pareto.png, per_difficulty.png")
