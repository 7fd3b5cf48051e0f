"""``mtlbench report``: tables and figures (PNG and SVG) and a README from a results folder."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from mtlbench import results  # noqa: E402
from mtlbench.aggregate import aggregate, setting_label  # noqa: E402
from mtlbench.errors import MtlbenchError  # noqa: E402

METHOD_COLOURS = {"tr": "#1f77b4", "hard": "#d62728", "separate": "#2ca02c", "cross-stitch": "#9467bd",
                  "stl": "#7f7f7f"}
EXTRA_COLOURS = ["#ff7f0e", "#8c564b", "#e377c2", "#bcbd22", "#17becf"]
TR_STYLES = ["-", "--", ":", "-."]
FIGURES = ["accuracy_vs_tasks", "params_vs_tasks", "throughput_vs_tasks", "accuracy_vs_sigma",
           "per_task_accuracy"]


def colour(method: str) -> str:
    if method not in METHOD_COLOURS:  # plugins: a stable colour of their own in every figure
        METHOD_COLOURS[method] = EXTRA_COLOURS[len(METHOD_COLOURS) % len(EXTRA_COLOURS)]
    return METHOD_COLOURS[method]


def _series(agg: pd.DataFrame):
    """(label, method, rows sorted by tasks, line style) for each method/sigma series."""
    sigmas = sorted(agg.loc[agg["method"] == "tr", "sigma"].dropna().unique())
    for label, rows in agg.groupby("label", sort=True):
        if rows["tasks"].nunique() < 2 and agg["tasks"].nunique() > 1:
            continue  # a sigma probed at one T only: it belongs to the accuracy-vs-sigma figure
        method = rows["method"].iloc[0]
        style = TR_STYLES[sigmas.index(rows["sigma"].iloc[0]) % len(TR_STYLES)] if method == "tr" else "-"
        yield label, method, rows.sort_values("tasks"), style


def _line(ax, rows, metric: str, label: str, method: str, style: str, scale: float = 1.0,
          band: bool = True) -> None:
    """One series; ``band`` shades the 95% CI across seeds (accuracy only: the spread of
    timings and parameter counts across seeds is not a sampling interval worth drawing)."""
    x, y = rows["tasks"], rows[f"{metric}_mean"] * scale
    ax.plot(x, y, style, marker="o", ms=3, color=colour(method), label=label)
    ci = rows[f"{metric}_ci95"] * scale
    if band and ci.notna().any():
        ax.fill_between(x, y - ci.fillna(0), y + ci.fillna(0), color=colour(method), alpha=0.15, lw=0)


def _task_axis(ax, agg) -> None:
    ticks = sorted(agg["tasks"].unique())
    ax.set_xscale("log")
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("number of tasks T")


def fig_accuracy_vs_tasks(agg, runs):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, name in zip(axes, ["mean_accuracy", "mean_balanced_accuracy"],
                                ["mean accuracy (%)", "mean balanced accuracy (%)"]):
        for label, method, rows, style in _series(agg):
            _line(ax, rows, metric, label, method, style, 100)
        ax.set(ylabel=name)
        _task_axis(ax, agg)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Accuracy vs number of tasks (mean over seeds, 95% CI bands)")
    return fig


def fig_params_vs_tasks(agg, runs):
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, method, rows, style in _series(agg):
        _line(ax, rows, "params_trainable", label, method, style, band=False)
    ax.set(yscale="log", ylabel="trainable parameters (count)",
           title="Trainable parameters vs number of tasks (measured)")
    _task_axis(ax, agg)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def fig_throughput_vs_tasks(agg, runs):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, name in zip(axes, ["train_pairs_per_s", "eval_images_per_s"],
                                ["training throughput ((image, task) pairs / s)",
                                 "inference throughput (images / s, all T tasks)"]):
        for label, method, rows, style in _series(agg):
            _line(ax, rows, metric, label, method, style, band=False)
        ax.set(yscale="log", ylabel=name)
        _task_axis(ax, agg)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle("Throughput vs number of tasks (median of timed steps after warm-up)")
    return fig


def fig_accuracy_vs_sigma(agg, runs):
    tr = agg[agg["method"] == "tr"]
    if tr.empty:
        return None
    swept = tr.groupby("tasks")["sigma"].nunique()
    if (swept > 1).any():  # only the T at which sigma was actually swept
        tr = tr[tr["tasks"].isin(swept[swept > 1].index)]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, (t, rows) in enumerate(tr.groupby("tasks")):
        rows = rows.sort_values("sigma")
        c = EXTRA_COLOURS[i % len(EXTRA_COLOURS)] if tr["tasks"].nunique() > 1 else colour("tr")
        y, ci = rows["mean_balanced_accuracy_mean"] * 100, rows["mean_balanced_accuracy_ci95"].fillna(0) * 100
        ax.errorbar(rows["sigma"], y, yerr=ci, fmt="-o", ms=3, color=c, capsize=2, label=f"tr, T={t}")
        for method, x, marker in (("separate", 0.0, "s"), ("hard", 1.0, "D")):
            end = agg[(agg["method"] == method) & (agg["tasks"] == t)]
            if len(end):
                ax.plot([x], end["mean_balanced_accuracy_mean"] * 100, marker, ms=8, mfc="none",
                        color=colour(method), label=f"{method} (σ={x:g}), T={t}")
    ax.set(xlabel="sharing ratio σ", ylabel="mean balanced accuracy (%)", xlim=(-0.05, 1.05),
           title="Task routing: accuracy vs σ (separate = σ 0, hard = σ 1)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def fig_per_task_accuracy(agg, runs):
    """Per-task balanced accuracy of every series at the largest T most series reached."""
    ok = [r for r in runs if r.get("status") == "ok"]
    if not ok:
        return None
    counts = pd.Series([r["config"]["tasks"] for r in ok]).value_counts()
    t = max(counts[counts == counts.max()].index)
    groups: dict[str, list[float]] = {}
    for r in ok:
        if r["config"]["tasks"] == t:
            label = setting_label(r["config"]["method"], r["config"]["sigma"])
            groups.setdefault(label, []).extend(100 * v for v in r["metrics"]["balanced_accuracy"])
    labels = sorted(groups)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(labels)), 4.5))
    box = ax.boxplot([groups[l] for l in labels], patch_artist=True)
    ax.set_xticks(range(1, len(labels) + 1), labels, rotation=20)
    for patch, label in zip(box["boxes"], labels):
        patch.set(facecolor=colour(label.split(" ")[0]), alpha=0.5)
    ax.set(ylabel="per-task balanced accuracy (%)", title=f"Distribution of per-task accuracy, T={t} (all seeds)")
    ax.grid(alpha=0.3, axis="y")
    return fig


def _md_table(df: pd.DataFrame) -> str:
    cells = [[str(c) for c in df.columns]] + [[_fmt(v) for v in row] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(r) + " |" for r in cells]
    lines.insert(1, "|" + "---|" * len(df.columns))
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.2f}"
    return str(v)


def summary_table(agg: pd.DataFrame) -> pd.DataFrame:
    pm = lambda m, s=1.0: [f"{a * s:.2f} ± {b * s:.2f}" if not pd.isna(b) else ("–" if pd.isna(a) else f"{a * s:.2f}")  # noqa: E731
                           for a, b in zip(agg[f"{m}_mean"], agg[f"{m}_ci95"])]
    return pd.DataFrame({
        "T": agg["tasks"], "method": agg["label"], "seeds": agg["seeds"],
        "acc %": pm("mean_accuracy", 100), "bal. acc %": pm("mean_balanced_accuracy", 100),
        "Δm acc %": pm("delta_m_accuracy"), "params": agg["params_trainable_mean"],
        "fwd MFLOP/img/task": agg["flops_forward_per_image_task_mean"] / 1e6,
        "train pairs/s": agg["train_pairs_per_s_mean"], "infer img/s": agg["eval_images_per_s_mean"],
        "peak MB": agg["peak_memory_mb_mean"], "wall s": agg["wall_seconds_mean"],
    }).sort_values(["T", "method"], kind="stable")


def growth_table(agg: pd.DataFrame) -> pd.DataFrame:
    """How each series' cost changes from its smallest to its largest T (measured values)."""
    rows = []
    for label, group in agg.groupby("label", sort=True):
        lo, hi = group.loc[group["tasks"].idxmin()], group.loc[group["tasks"].idxmax()]
        if lo["tasks"] == hi["tasks"]:
            continue
        ratio = lambda m: hi[f"{m}_mean"] / lo[f"{m}_mean"]  # noqa: E731
        rows.append({"method": label, "T": f"{lo['tasks']} → {hi['tasks']}",
                     "params ×": ratio("params_trainable"),
                     "train pairs/s ×": ratio("train_pairs_per_s"),
                     "infer img/s ×": ratio("eval_images_per_s"),
                     "wall s ×": ratio("wall_seconds")})
    return pd.DataFrame(rows)


def write_report(results_dir: Path, out: Path, title: str | None = None, warn=print) -> list[Path]:
    """Write tables, figures and README.md into ``out``; returns the files written."""
    runs = results.load_runs(Path(results_dir), warn=warn)
    if not runs:
        raise MtlbenchError(f"no run results in {str(results_dir)!r}")
    df = results.table(runs)
    agg = aggregate(df)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, frame in (("runs", df), ("aggregate", agg)):
        frame.to_csv(out / f"{name}.csv", index=False)
        frame.to_parquet(out / f"{name}.parquet", index=False)
        written += [out / f"{name}.csv", out / f"{name}.parquet"]
    figures = []
    for name in FIGURES:
        fig = globals()[f"fig_{name}"](agg, runs)
        if fig is None:
            continue
        fig.tight_layout()
        for ext in ("png", "svg"):
            fig.savefig(out / f"{name}.{ext}", dpi=110)
            written.append(out / f"{name}.{ext}")
        plt.close(fig)
        figures.append(name)
    (out / "README.md").write_text(_readme(title or out.name, runs, df, agg, figures))
    return written + [out / "README.md"]


def _readme(title: str, runs: list[dict], df: pd.DataFrame, agg: pd.DataFrame, figures: list[str]) -> str:
    env = runs[0].get("environment", {})
    commands = sorted({r.get("command") or "(not recorded)" for r in runs})
    commits = sorted({str(r.get("environment", {}).get("git_commit")) for r in runs})
    status = df["status"].value_counts().to_dict()
    lines = [f"# {title}", "", "## How it was produced", "", "```"] + commands + ["```", "",
             f"- commit(s): {', '.join(commits)}",
             f"- machine: {env.get('cpu')}, {env.get('cpu_count')} CPUs, {env.get('threads')} torch threads, "
             f"GPU: {env.get('cuda') or 'none'}; {env.get('platform')}",
             "- packages: " + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items()),
             f"- runs: {len(df)} ({', '.join(f'{v} {k}' for k, v in status.items())}); "
             f"total run time {df['wall_seconds'].sum() / 60:.1f} min",
             "", "Numbers are the mean over seeds ± the half-width of the 95% t-interval.", "",
             "## Results", "", _md_table(summary_table(agg)), "",
             "## How cost grows with the number of tasks", "",
             "Ratios of the largest-T to the smallest-T value of each series (1.00 = flat).", "",
             _md_table(growth_table(agg)), ""]
    skipped = df[df["status"] != "ok"]
    if len(skipped):
        lines += ["## Skipped or failed runs", "", _md_table(skipped[["method", "tasks", "sigma", "seed",
                                                                      "status", "reason"]]), ""]
    lines += ["## Figures", ""] + [f"![{f}]({f}.png)\n" for f in figures]
    lines += ["Tables: `runs.csv` (one row per run) and `aggregate.csv` (per setting), also as Parquet."]
    return "\n".join(lines) + "\n"
