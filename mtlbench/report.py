"""``mtlbench report``: tables and figures (PNG and SVG) and a README from a results folder."""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mtlbench import breakdown, results  # noqa: E402
from mtlbench.aggregate import aggregate, distinct_labels, option_value, select_val  # noqa: E402
from mtlbench.config import same_numbers  # noqa: E402
from mtlbench.errors import MtlbenchError  # noqa: E402
from mtlbench.registry import METHODS  # noqa: E402

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]  # matplotlib's tab10
PALETTE_SALT = "7:"  # makes the five built-in methods land on five different colours
STYLES = ["-", "--", ":", "-."]
FIGURES = ["accuracy_vs_tasks", "params_vs_tasks", "throughput_vs_tasks", "accuracy_vs_option",
           "per_task_accuracy", "learning_curves", "step_time_vs_tasks"]
METRIC_NAMES = {"balanced_accuracy": "balanced accuracy", "accuracy": "accuracy", "auroc": "AUROC",
                "ap": "average precision"}


def colour(method: str) -> str:
    """A colour that depends on the method's name only: the same in every figure and report."""
    digest = int(hashlib.sha256(f"{PALETTE_SALT}{method}".encode()).hexdigest(), 16)
    return PALETTE[digest % len(PALETTE)]


def paints(series: list[tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """(colour, line style) for each (label, method) series of one figure.

    A method drawn once keeps its own colour (from its name, the same in every figure). A method
    drawn several times (a sweep of its weightings or options) keeps its colour for its first
    series and gives the others the palette's remaining colours in label order, so that no two
    series of one figure look alike until the palette runs out; then the line style changes."""
    by_method: dict[str, list[str]] = {}
    for label, method in sorted(series):
        by_method.setdefault(method, []).append(label)
    out = {labels[0]: (colour(method), STYLES[0]) for method, labels in by_method.items()}
    free = [c for c in PALETTE if c not in {paint for paint, _ in out.values()}] or PALETTE
    extra = [label for labels in by_method.values() for label in labels[1:]]
    for i, label in enumerate(sorted(extra)):
        out[label] = (free[i % len(free)], STYLES[i // len(free) % len(STYLES)])
    return out


def _series(agg: pd.DataFrame):
    """(label, colour, rows sorted by tasks, line style) for each series with two or more T."""
    shown = [(label, rows) for label, rows in agg.groupby("label", sort=True)
             if rows["tasks"].nunique() >= 2 or agg["tasks"].nunique() < 2]  # else: the option figure
    look = paints([(label, rows["method"].iloc[0]) for label, rows in shown])
    for label, rows in shown:
        paint, style = look[label]
        yield label, paint, rows.sort_values("tasks"), style


def _line(ax, rows, metric: str, label: str, paint: str, style: str, scale: float = 1.0,
          band: bool = True) -> None:
    """One series; ``band`` shades the 95% CI across seeds (metrics only: the spread of
    timings and parameter counts across seeds is not a sampling interval worth drawing)."""
    x, y = rows["tasks"], rows[f"{metric}_mean"] * scale
    ax.plot(x, y, style, marker="o", ms=3, color=paint, label=label)
    ci = rows[f"{metric}_ci95"] * scale
    if band and ci.notna().any():
        ax.fill_between(x, y - ci.fillna(0), y + ci.fillna(0), color=paint, alpha=0.15, lw=0)


def _legend(axes) -> None:
    """The first panel's legend: inside it for a few series, beside the last panel for many
    (a weighting sweep), where it hides no line."""
    axes = list(np.atleast_1d(axes))
    handles, labels = axes[0].get_legend_handles_labels()
    if len(labels) > 8:
        axes[-1].legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    else:
        axes[0].legend(fontsize=8)


def _task_axis(ax, agg) -> None:
    ticks = sorted(agg["tasks"].unique())
    ax.set_xscale("log")
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("number of tasks T")


def _log_y(ax) -> None:
    """A log y axis where something positive was drawn; otherwise a note that nothing was
    measured (e.g. every run of the folder skipped on its budget before inference)."""
    if any(np.isfinite(y := np.asarray(line.get_ydata(), float)).any() and (y[np.isfinite(y)] > 0).any()
           for line in ax.get_lines()):
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no measurements (no completed runs)", transform=ax.transAxes, ha="center", va="center")


def fig_accuracy_vs_tasks(agg, runs, metric):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    second = "accuracy" if metric != "accuracy" else "balanced_accuracy"
    for ax, m in zip(axes, [metric, second]):
        for label, paint, rows, style in _series(agg):
            _line(ax, rows, f"mean_{m}", label, paint, style, 100)
        ax.set(ylabel=f"mean {METRIC_NAMES[m]} (%)")
        _task_axis(ax, agg)
        ax.grid(alpha=0.3)
    _legend(axes)
    fig.suptitle("Test score vs number of tasks (best-validation checkpoint; mean over seeds, 95% CI bands)")
    return fig


def fig_params_vs_tasks(agg, runs, metric):
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, paint, rows, style in _series(agg):
        _line(ax, rows, "params_trainable", label, paint, style, band=False)
    _log_y(ax)
    ax.set(ylabel="trainable parameters (count)", title="Trainable parameters vs number of tasks (measured)")
    _task_axis(ax, agg)
    ax.grid(alpha=0.3, which="both")
    _legend(ax)
    return fig


def fig_throughput_vs_tasks(agg, runs, metric):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, m, name in zip(axes, ["train_pairs_per_s", "eval_images_per_s"],
                           ["training throughput ((image, task) pairs / s)",
                            "inference throughput (images / s, all T tasks)"]):
        for label, paint, rows, style in _series(agg):
            _line(ax, rows, m, label, paint, style, band=False)
        _log_y(ax)
        ax.set(ylabel=name)
        _task_axis(ax, agg)
        ax.grid(alpha=0.3, which="both")
    _legend(axes)
    fig.suptitle("Throughput vs number of tasks (median of timed steps after warm-up)")
    return fig


def swept_options(agg: pd.DataFrame) -> list[tuple[str, str]]:
    """(method, option) pairs whose numeric value varies between settings of one T."""
    found = []
    for method, rows in agg.groupby("method"):
        options = [json.loads(o) for o in rows["options"]]
        for name in sorted({k for o in options for k, v in o.items() if isinstance(v, (int, float))
                            and not isinstance(v, bool)}):
            values = pd.Series([o.get(name) for o in options], index=rows.index)
            if (values.groupby(rows["tasks"]).nunique() > 1).any():
                found.append((method, name))
    return found


def _label_without(method: str, options: str, label: str, name: str) -> str:
    """A series' label with the option ``name`` (the figure's x axis) left out."""
    if method in METHODS:
        return METHODS.get(method).label({k: v for k, v in json.loads(options).items() if k != name})
    return re.sub(rf"\s*{re.escape(name)}=\S+", "", label)


def fig_accuracy_vs_option(agg, runs, metric):
    """The headline metric against each swept numeric method option (task routing's sigma),
    with methods that equal that method at some value (``Method.same_as``) marked there."""
    swept = swept_options(agg)
    if not swept:
        return None
    fig, axes = plt.subplots(1, len(swept), figsize=(6 * len(swept), 4.5), squeeze=False)
    for ax, (method, name) in zip(axes[0], swept):
        rows = agg[agg["method"] == method].copy()
        rows["x"] = [option_value(o, name) for o in rows["options"]]
        varied = rows.groupby("tasks")["x"].nunique()
        rows = rows[rows["tasks"].isin(varied[varied > 1].index)]
        for i, (t, group) in enumerate(rows.groupby("tasks")):
            rest_of = [_label_without(method, o, label, name) for o, label in zip(group["options"], group["label"])]
            for j, (rest, line) in enumerate(group.groupby(pd.Series(rest_of, index=group.index))):
                line = line.sort_values("x")
                y = line[f"mean_{metric}_mean"] * 100
                ci = line[f"mean_{metric}_ci95"].fillna(0) * 100
                c = PALETTE[(i + j) % len(PALETTE)] if group["tasks"].nunique() > 1 or i or j else colour(method)
                ax.errorbar(line["x"], y, yerr=ci, fmt="-o", ms=3, color=c, capsize=2,
                            label=f"{rest.strip() or method}, T={t}")
            for other, cls in ((m, METHODS.get(m)) for m in agg["method"].unique() if m in METHODS):
                if cls.same_as and cls.same_as[0] == method and name in cls.same_as[1]:
                    end = agg[(agg["method"] == other) & (agg["tasks"] == t)]
                    if len(end):
                        ax.plot([cls.same_as[1][name]], end[f"mean_{metric}_mean"].iloc[:1] * 100, "D", ms=8,
                                mfc="none", color=colour(other), label=f"{other} ({name}={cls.same_as[1][name]:g}), T={t}")
        ax.set(xlabel=f"{method} option {name}", ylabel=f"mean {METRIC_NAMES[metric]} (%)",
               title=f"{method}: test score vs {name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def fig_per_task_accuracy(agg, runs, metric):
    """Per-task scores of every series at the largest T most series reached."""
    ok = [r for r in runs if r.get("status") == "ok"]
    if not ok:
        return None
    counts = pd.Series([r["config"]["tasks"] for r in ok]).value_counts()
    t = max(counts[counts == counts.max()].index)
    groups: dict[str, list[float]] = {}
    methods: dict[str, str] = {}
    for r in ok:
        if r["config"]["tasks"] == t:
            groups.setdefault(r["label"], []).extend(100 * v for v in r["metrics"][metric] if not _nan(v))
            methods[r["label"]] = r["config"]["method"]
    labels = sorted(groups)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(labels)), 4.5))
    box = ax.boxplot([groups[label] for label in labels], patch_artist=True)
    ax.set_xticks(range(1, len(labels) + 1), labels, rotation=20)
    look = paints([(label, methods[label]) for label in labels])
    for patch, label in zip(box["boxes"], labels):
        patch.set(facecolor=look[label][0], alpha=0.5)
    ax.set(ylabel=f"per-task {METRIC_NAMES[metric]} (%)",
           title=f"Distribution of per-task test {METRIC_NAMES[metric]}, T={t} (all seeds)")
    ax.grid(alpha=0.3, axis="y")
    return fig


def fig_learning_curves(agg, runs, metric):
    """Validation score against supervised (image, task) pairs seen, one line per series
    (mean over seeds), at the largest T most series reached."""
    ok = [r for r in runs if r.get("status") == "ok" and any("val" in p for p in r.get("train", {}).get("curve", []))]
    if not ok:
        return None
    counts = pd.Series([r["config"]["tasks"] for r in ok]).value_counts()
    t = max(counts[counts == counts.max()].index)
    curves: dict[str, list] = {}
    methods: dict[str, str] = {}
    key = f"mean_{metric}"
    for r in ok:
        if r["config"]["tasks"] == t:
            points = [(p["pairs"], p["val"].get(key)) for p in r["train"]["curve"] if "val" in p]
            curves.setdefault(r["label"], []).append(points)
            methods[r["label"]] = r["config"]["method"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    look = paints([(label, methods[label]) for label in curves])
    for label in sorted(curves):
        length = min(len(c) for c in curves[label])
        x = np.mean([[p[0] for p in c[:length]] for c in curves[label]], axis=0)
        y = np.nanmean([[np.nan if p[1] is None else p[1] for p in c[:length]] for c in curves[label]], axis=0)
        ax.plot(x, 100 * y, look[label][1], marker="o", ms=3, color=look[label][0], label=label)
    ax.set(xscale="log", xlabel="supervised (image, task) pairs seen", ylabel=f"validation mean {METRIC_NAMES[metric]} (%)",
           title=f"Learning curves, T={t} (mean over seeds)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def slope(rows: pd.DataFrame, metric: str) -> float:
    """Least-squares slope of log(metric) against log(T): the exponent of its growth with T."""
    rows = rows[rows[f"{metric}_mean"].notna() & (rows[f"{metric}_mean"] > 0)]
    if rows["tasks"].nunique() < 2:
        return math.nan
    return float(np.polyfit(np.log(rows["tasks"]), np.log(rows[f"{metric}_mean"]), 1)[0])


def fig_step_time_vs_tasks(agg, runs, metric):
    """Training step time and peak memory against T (log-log), each series' slope in its label
    (step time ∝ T^slope). Runs skipped on their time budget count here from their probe steps."""
    if agg["tasks"].nunique() < 2:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, m, name in zip(axes, ["step_seconds", "peak_memory_mb"],
                           ["training step time (s, median)", "peak memory (MB)"]):
        for label, paint, rows, style in _series(agg):
            k = slope(rows, m)
            _line(ax, rows, m, f"{label} (slope {k:.2f})" if not math.isnan(k) else label, paint, style, band=False)
        _log_y(ax)
        ax.set(ylabel=name)
        _task_axis(ax, agg)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("Cost of a training step as T grows (log-log; slope = exponent of T)")
    return fig


def _nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


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


def _pm(agg: pd.DataFrame, m: str, scale: float = 1.0) -> list[str]:
    return [f"{a * scale:.2f} ± {b * scale:.2f}" if not pd.isna(b) else ("–" if pd.isna(a) else f"{a * scale:.2f}")
            for a, b in zip(agg[f"{m}_mean"], agg[f"{m}_ci95"])]


def summary_table(agg: pd.DataFrame, metric: str) -> pd.DataFrame:
    other = "accuracy" if metric != "accuracy" else "balanced_accuracy"
    return pd.DataFrame({
        "T": agg["tasks"], "method": agg["label"], "seeds": agg["seeds"],
        f"{METRIC_NAMES[metric]} %": _pm(agg, f"mean_{metric}", 100),
        f"Δm {METRIC_NAMES[metric]} %": _pm(agg, f"delta_m_{metric}"),
        f"{METRIC_NAMES[other]} %": _pm(agg, f"mean_{other}", 100),
        "AUROC %" if metric != "auroc" else "AP %": _pm(agg, "mean_auroc" if metric != "auroc" else "mean_ap", 100),
        f"final ckpt {METRIC_NAMES[metric]} %": _pm(agg, f"final_mean_{metric}", 100),
        "params": agg["params_trainable_mean"],
        "fwd MFLOP/img/task": agg["flops_forward_per_image_task_mean"] / 1e6,
        "train pairs/s": agg["train_pairs_per_s_mean"], "infer img/s": agg["eval_images_per_s_mean"],
        "step ms": agg["step_seconds_mean"] * 1000, "peak MB": agg["peak_memory_mb_mean"],
        "wall s": agg["wall_seconds_mean"],
        "note": ["over the time budget: cost from probe steps only" if m else "" for m in agg["measured_only"]],
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
                     "step time ∝ T^": slope(group, "step_seconds"),
                     "peak memory ∝ T^": slope(group, "peak_memory_mb")})
    return pd.DataFrame(rows)


def tuning_table(df: pd.DataFrame) -> pd.DataFrame:
    """How many values each method was tuned over, and which it kept, per setting."""
    rows = df.drop_duplicates("setting")[["label", "tasks", "tuned_over", "tuned_values", "chosen"]]
    return rows.sort_values(["tasks", "label"], kind="stable").rename(
        columns={"label": "method", "tasks": "T", "tuned_over": "values tried", "tuned_values": "tried",
                 "chosen": "chosen on validation"})


def write_report(results_dir: Path, out: Path, title: str | None = None, warn=print,
                 metric: str = "balanced_accuracy", tune: list[str] | None = None) -> list[Path]:
    """Write tables, figures and README.md into ``out``; returns the files written."""
    runs = results.load_runs(Path(results_dir), warn=warn)
    if not runs:
        raise MtlbenchError(f"no run results in {str(results_dir)!r}")
    if out.exists() and not out.is_dir():
        raise MtlbenchError(f"--out {str(out)!r} exists and is not a folder")
    df = results.table(runs)
    if tune:
        chosen = select_val(df, tune)
        runs = [r for r in runs if r["key"] in set(chosen["key"])]
        df = results.table(runs, ignore=tuple(tune)).merge(
            chosen[["key", "tuned_group", "tuned_over", "tuned_values", "chosen"]], on="key")
    df = distinct_labels(df)  # after tuning: the values tuned over are no longer settings apart
    labels = dict(zip(df["key"], df["label"]))
    runs = [{**r, "label": labels.get(r["key"], r.get("label"))} for r in runs]
    agg = aggregate(df)
    groups = breakdown.group_scores(runs, metric)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MtlbenchError(f"cannot write the report to {str(out)!r}: {exc.strerror or exc}") from None
    written = []
    for name, frame in (("runs", df), ("aggregate", agg)) + ((("groups", groups),) if len(groups) else ()):
        frame.to_csv(out / f"{name}.csv", index=False)
        frame.to_parquet(out / f"{name}.parquet", index=False)
        written += [out / f"{name}.csv", out / f"{name}.parquet"]
    figures = []
    for name in FIGURES:
        fig = globals()[f"fig_{name}"](agg, runs, metric)
        if fig is None:
            continue
        fig.tight_layout()
        for ext in ("png", "svg"):
            fig.savefig(out / f"{name}.{ext}", dpi=110, bbox_inches="tight")
            written.append(out / f"{name}.{ext}")
        plt.close(fig)
        figures.append(name)
    (out / "README.md").write_text(_readme(title or out.name, runs, df, agg, figures, metric, tune, groups))
    return written + [out / "README.md"]


def _readme(title: str, runs: list[dict], df: pd.DataFrame, agg: pd.DataFrame, figures: list[str],
            metric: str, tune: list[str] | None,
            groups: pd.DataFrame) -> str:
    env = runs[0].get("environment", {})
    commands = sorted({r.get("command") or "(not recorded)" for r in runs})
    resumes = [r for r in runs if ((r.get("train") or {}).get("checkpoints") or {}).get("resumed")]
    commits = sorted({str(r.get("environment", {}).get("git_commit")) for r in runs}
                     | {str(x.get("saved_by_commit")) for r in resumes for x in r["train"]["checkpoints"]["resumed"]})
    status = df["status"].value_counts().to_dict()
    budgets = sorted({json.dumps(same_numbers({k: r["train"]["budget"][k] for k in ("epochs", "batches_per_task", "given_as")}))
                      for r in runs if r.get("status") == "ok"})
    ref = METHODS.reference
    lines = [f"# {title}", "", "## How it was produced", "", "```"] + commands + ["```", "",
             f"- commit(s): {', '.join(commits)}",
             f"- machine: {env.get('cpu')}, {env.get('cpu_count')} CPUs, {env.get('threads')} torch threads, "
             f"GPU: {env.get('cuda') or 'none'}; {env.get('platform')}",
             "- packages: " + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items()),
             f"- runs: {len(df)} ({', '.join(f'{v} {k}' for k, v in status.items())}); "
             f"total run time {df['wall_seconds'].sum() / 60:.1f} min"
             + (f"; {len(resumes)} resumed from a checkpoint after an interruption (the same numbers as "
                "uninterrupted; their run time counts the part after the last resume, their training time "
                "all of it)" if resumes else ""),
             "- budget per task: " + "; ".join(budgets),
             "",
             f"**Headline metric: mean {METRIC_NAMES[metric]}** over the tasks, on the test split, of the checkpoint "
             "with the best mean validation balanced accuracy (the final checkpoint's score is in its own column). "
             f"Δm is taken on the same metric against `{ref}` in the same setting. Numbers are the mean over seeds "
             "± the half-width of the 95% t-interval.", ""]
    if tune:
        lines += ["## Tuning", "",
                  f"Selected on validation over {', '.join(f'`{t}`' for t in tune)}: per method and setting, the "
                  "values with the best mean validation score were kept and their test scores reported. Every "
                  "method was tuned over the values below; the test split took no part in the choice.", "",
                  _md_table(tuning_table(df)), ""]
    lines += ["## Results", "", _md_table(summary_table(agg, metric)), ""]
    if len(groups):  # the dataset recorded ground-truth task groups (clusters, noisy tasks)
        lines += ["## By task group", "",
                  f"Per-task test {METRIC_NAMES[metric]} averaged within each ground-truth group the dataset "
                  "recorded, then over seeds (mean ± 95% CI). A grouping with many groups shows the mean, the "
                  "worst and the best group.", "", breakdown.markdown(groups), ""]
    growth = growth_table(agg)
    if len(growth):  # only when some series spans several T
        lines += ["## How cost grows with the number of tasks", "",
                  "Ratios of the largest-T to the smallest-T value of each series (1.00 = flat).", "",
                  _md_table(growth), ""]
    skipped = df[df["status"] != "ok"]
    if len(skipped):
        lines += ["## Skipped or failed runs", "", _md_table(skipped[["label", "tasks", "seed", "status", "reason"]]), ""]
    lines += ["## Figures", ""] + [f"![{f}]({f}.png)\n" for f in figures]
    lines += ["Tables: `runs.csv` (one row per run) and `aggregate.csv` (per setting), also as Parquet."]
    return "\n".join(lines) + "\n"
