"""``mtlbench compare BASELINE NEW``: per-setting regressions in accuracy and throughput.

Either side may be a results folder (its run files are read) or a table written by mtlbench
(``results.csv``/``.parquet`` or a report's ``runs.csv``). Settings are matched on everything
but the seed, and seeds are averaged.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from mtlbench import results
from mtlbench.aggregate import SETTING, aggregate, fill_later_columns
from mtlbench.errors import MtlbenchError


def load_table(path: Path, warn=print) -> pd.DataFrame:
    path = Path(path)
    if path.is_dir():
        return results.table(results.load_runs(path, warn=warn))
    if not path.exists():
        raise MtlbenchError(f"{str(path)!r} does not exist (give a results folder or a results table)")
    try:
        df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as exc:  # pandas raises many types for a malformed file
        raise MtlbenchError(f"cannot read {str(path)!r} as a results table: {exc}") from None
    df = fill_later_columns(df)
    missing = {"status", "seed", "mean_accuracy", "train_pairs_per_s", *SETTING} - set(df.columns)
    if missing:
        raise MtlbenchError(f"{str(path)!r} is not an mtlbench results table (missing {', '.join(sorted(missing))})")
    return df


def compare(base: pd.DataFrame, new: pd.DataFrame, max_acc_drop: float, max_slowdown: float,
            metric: str = "mean_accuracy") -> tuple[pd.DataFrame, int]:
    """Per-setting differences, and the number of problems (regressions plus missing settings)."""
    a, b = aggregate(base), aggregate(new)
    for df in (a, b):
        df["sigma"] = df["sigma"].map(lambda s: "-" if pd.isna(s) else f"{s:g}")
    keys = SETTING + ["label"]
    m = a.merge(b, on=keys, how="left", suffixes=("_base", "_new"), indicator=True)
    out = pd.DataFrame({
        "tasks": m["tasks"], "method": m["label"], "dataset": m["dataset"],
        "acc_base": 100 * m[f"{metric}_mean_base"], "acc_new": 100 * m[f"{metric}_mean_new"],
        "thr_base": m["train_pairs_per_s_mean_base"], "thr_new": m["train_pairs_per_s_mean_new"],
    })
    out["acc_change_pts"] = out["acc_new"] - out["acc_base"]
    out["thr_change_pct"] = 100 * (out["thr_new"] - out["thr_base"]) / out["thr_base"]
    missing = m["_merge"] == "left_only"
    verdicts = []
    for miss, acc, thr in zip(missing, out["acc_change_pts"], out["thr_change_pct"]):
        v = []
        if miss:
            v.append("MISSING in new")
        if not miss and acc < -max_acc_drop:
            v.append(f"ACCURACY -{-acc:.2f} pts")
        if not miss and thr < -max_slowdown:
            v.append(f"SLOWER {-thr:.1f}%")
        verdicts.append("; ".join(v) or "ok")
    out["verdict"] = verdicts
    return out, sum(v != "ok" for v in verdicts)


def render(df: pd.DataFrame) -> str:
    show = df.copy()
    for c in ("acc_base", "acc_new", "acc_change_pts", "thr_change_pct"):
        show[c] = show[c].map(lambda v: "n/a" if pd.isna(v) else f"{v:+.2f}" if "change" in c else f"{v:.2f}")
    for c in ("thr_base", "thr_new"):
        show[c] = show[c].map(lambda v: "n/a" if pd.isna(v) else f"{v:,.0f}")
    return show.to_string(index=False)
