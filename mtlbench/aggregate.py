"""Aggregation across seeds: the mean and the 95% confidence interval of each metric."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

# Two-sided 95% critical values of Student's t for 1..30 degrees of freedom (standard
# tables, e.g. NIST/SEMATECH e-Handbook of Statistical Methods, table 1.3.6.7.2).
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
       2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
       2.060, 2.056, 2.052, 2.048, 2.045, 2.042]

SETTING = ["dataset", "backbone", "method", "tasks", "sigma", "schedule", "steps_per_task",
           "batch_size", "lr", "device", "precision"]
# Setting columns added later, and the value every run had before they existed.
LATER_COLUMNS = {"precision": "fp32"}
METRICS = ["mean_accuracy", "mean_balanced_accuracy", "delta_m_accuracy", "delta_m_balanced_accuracy",
           "params_trainable", "flops_forward_per_image_task", "flops_train_per_pair",
           "train_pairs_per_s", "eval_images_per_s", "peak_memory_mb", "wall_seconds"]


def ci95(values) -> float:
    """Half-width of the 95% t-interval of the mean; NaN for fewer than two values."""
    v = np.asarray([x for x in values if x is not None and not pd.isna(x)], dtype=float)
    if len(v) < 2:
        return math.nan
    t = T95[len(v) - 2] if len(v) - 1 <= len(T95) else 1.96
    return float(t * v.std(ddof=1) / math.sqrt(len(v)))


def setting_label(method: str, sigma) -> str:
    return f"tr σ={sigma:g}" if method == "tr" and sigma is not None and not pd.isna(sigma) else method


def fill_later_columns(df: pd.DataFrame) -> pd.DataFrame:
    """A table written before a setting column existed gets the value all its runs had."""
    for column, value in LATER_COLUMNS.items():
        if column not in df:
            df[column] = value
    return df


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """One row per setting (everything but the seed) of the ok runs: ``<metric>_mean``,
    ``<metric>_ci95`` and ``seeds``."""
    ok = fill_later_columns(df[df["status"] == "ok"].copy())
    ok["sigma"] = ok["sigma"].astype(float)
    rows = []
    for key, group in ok.groupby(SETTING, dropna=False, sort=True):
        row = dict(zip(SETTING, key))
        row["seeds"] = int(group["seed"].nunique())
        for m in METRICS:
            values = pd.to_numeric(group[m], errors="coerce")
            row[f"{m}_mean"] = values.mean() if values.notna().any() else math.nan
            row[f"{m}_ci95"] = ci95(values)
        rows.append(row)
    cols = SETTING + ["seeds"] + [f"{m}_{s}" for m in METRICS for s in ("mean", "ci95")]
    out = pd.DataFrame(rows, columns=cols)
    out.insert(3, "label", [setting_label(m, s) for m, s in zip(out["method"], out["sigma"])])
    return out
