"""Per-task scores broken down by the ground-truth task groups a dataset records.

A generated dataset knows things about its tasks that a score averaged over all of them
hides: which cluster each belongs to, which are noisy. Runs record these groupings
(``data.task_groups``); this module averages each run's per-task scores within each group,
then takes the mean and 95% interval across seeds, per method, T and grouping.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from mtlbench.aggregate import ci95

MAX_COLUMNS = 4  # a grouping with more groups than this is summarised (mean, worst, best group)


def _group_means(scores: list[float], labels: list[str]) -> dict[str, float]:
    by: dict[str, list[float]] = {}
    for score, label in zip(scores, labels):
        if score is not None and not math.isnan(score):
            by.setdefault(label, []).append(score)
    return {label: float(np.mean(v)) for label, v in by.items()}


def _summary(means: dict[str, float], columns: list[str]) -> dict[str, float]:
    if len(columns) <= MAX_COLUMNS:
        return {c: means.get(c, math.nan) for c in columns}
    values = list(means.values())
    return {"mean of groups": float(np.mean(values)), "worst group": min(values), "best group": max(values)}


def group_scores(runs: list[dict], metric: str) -> pd.DataFrame:
    """One row per (method label, T, grouping) with ``<column> mean`` and ``<column> ci95``
    across seeds; empty when no run recorded task groups."""
    per_run = []
    for r in runs:
        groups = (r.get("data") or {}).get("task_groups") or {}
        if r.get("status") != "ok" or not groups:
            continue
        for grouping, labels in groups.items():
            columns = sorted(set(labels))
            per_run.append({"label": r["label"], "T": r["config"]["tasks"], "grouping": grouping,
                            "groups": len(columns),
                            **_summary(_group_means(r["metrics"][metric], labels), columns)})
    if not per_run:
        return pd.DataFrame()
    df = pd.DataFrame(per_run)
    rows = []
    for (label, t, grouping), part in df.groupby(["label", "T", "grouping"], sort=True):
        row = {"T": t, "method": label, "grouping": grouping, "groups": int(part["groups"].max()),
               "seeds": len(part)}
        for column in part.columns.drop(["label", "T", "grouping", "groups"]):
            values = part[column].dropna()
            if len(values):
                row[f"{column} mean"], row[f"{column} ci95"] = float(values.mean()), ci95(values)
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["grouping", "T", "method"], kind="stable")


def markdown(df: pd.DataFrame, scale: float = 100.0) -> str:
    """The table as Markdown, ``mean ± ci`` per group column (in percent)."""
    columns = [c[:-5] for c in df.columns if c.endswith(" mean")]
    head = ["T", "method", "grouping", "groups", "seeds"] + [f"{c} %" for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in df.iterrows():
        cells = [str(r["T"]), r["method"], r["grouping"], str(r["groups"]), str(r["seeds"])]
        for c in columns:
            m, ci = r.get(f"{c} mean"), r.get(f"{c} ci95")
            cells.append("–" if m is None or pd.isna(m) else
                         f"{m * scale:.2f}" + ("" if ci is None or pd.isna(ci) else f" ± {ci * scale:.2f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
