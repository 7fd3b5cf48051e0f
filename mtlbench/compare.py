"""``mtlbench compare BASELINE NEW``: per-setting regressions in a metric and in throughput.

Either side may be a results folder (its run files are read) or a table written by mtlbench
(``results.csv``/``.parquet`` or a report's ``runs.csv``). Settings are matched by their
identity (:func:`mtlbench.config.setting_key`: everything but the seed), and seeds are
averaged. A value that is missing or not a number on the new side is a problem, never a pass.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from mtlbench import results
from mtlbench.aggregate import aggregate, select_val
from mtlbench.config import reference_key, setting, setting_key
from mtlbench.errors import MtlbenchError

NEEDED = {"status", "seed", "setting", "label", "tasks", "dataset", "train_pairs_per_s", "mean_accuracy",
          "mean_balanced_accuracy"}


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
    missing = NEEDED - set(df.columns)
    if missing:
        raise MtlbenchError(f"{str(path)!r} is not a results table of this mtlbench version (missing "
                            f"{', '.join(sorted(missing))}); compare the results folder, or rebuild the table "
                            "with mtlbench report")
    return as_now(df)


def as_now(df: pd.DataFrame) -> pd.DataFrame:
    """A table file's setting identity as this version defines it: ``setting`` and ``reference``
    recomputed from each row's ``setting_config``, so that a table written before a change of
    the identity (a committed report, a CI baseline) still matches the same setting run now."""
    if "setting_config" not in df.columns:
        return df
    configs = [setting(json.loads(c)) if isinstance(c, str) else None for c in df["setting_config"]]
    df = df.copy()
    for column, rule in (("setting", setting_key), ("reference", reference_key)):
        if column in df.columns:
            df[column] = [rule(c) if c is not None else old for c, old in zip(configs, df[column])]
    df["setting_config"] = [json.dumps(c, sort_keys=True) if c is not None else old
                            for c, old in zip(configs, df["setting_config"])]
    return df


def compare(base: pd.DataFrame, new: pd.DataFrame, max_acc_drop: float, max_slowdown: float,
            metric: str = "mean_balanced_accuracy", tune: list[str] | None = None) -> tuple[pd.DataFrame, int]:
    """Per-setting differences, and the number of problems (regressions, missing settings,
    values that are not numbers). ``tune``: select on validation over these options first."""
    if tune:  # the chosen values may differ between the sides: match settings without them
        base, new = select_val(base, tune), select_val(new, tune)
    a, b = aggregate(base), aggregate(new)
    key = "tuned_group" if tune else "setting"
    m = a.merge(b, on=key, how="left", suffixes=("_base", "_new"), indicator=True)
    out = pd.DataFrame({
        "tasks": m["tasks_base"], "method": m["label_base"], "dataset": m["dataset_base"],
        "metric_base": 100 * m[f"{metric}_mean_base"], "metric_new": 100 * m[f"{metric}_mean_new"],
        "thr_base": m["train_pairs_per_s_mean_base"], "thr_new": m["train_pairs_per_s_mean_new"],
    })
    out["metric_change_pts"] = out["metric_new"] - out["metric_base"]
    out["thr_change_pct"] = 100 * (out["thr_new"] - out["thr_base"]) / out["thr_base"]
    missing = m["_merge"] == "left_only"
    verdicts = []
    for miss, new_metric, change, thr_new, thr in zip(missing, out["metric_new"], out["metric_change_pts"],
                                                      out["thr_new"], out["thr_change_pct"]):
        v = []
        if miss:
            v.append("MISSING in new")
        else:
            if not _number(new_metric):
                v.append(f"{metric.upper()} NOT A NUMBER")
            elif _number(change) and change < -max_acc_drop:
                v.append(f"{metric.upper()} -{-change:.2f} pts")
            if not _number(thr_new):
                v.append("THROUGHPUT NOT A NUMBER")
            elif _number(thr) and thr < -max_slowdown:
                v.append(f"SLOWER {-thr:.1f}%")
        verdicts.append("; ".join(v) or "ok")
    out["verdict"] = verdicts
    return out, sum(v != "ok" for v in verdicts)


def _number(v) -> bool:
    return v is not None and not pd.isna(v) and math.isfinite(float(v))


def render(df: pd.DataFrame) -> str:
    show = df.copy()
    for c in ("metric_base", "metric_new", "metric_change_pts", "thr_change_pct"):
        show[c] = show[c].map(lambda v: "n/a" if pd.isna(v) else f"{v:+.2f}" if "change" in c else f"{v:.2f}")
    for c in ("thr_base", "thr_new"):
        show[c] = show[c].map(lambda v: "n/a" if pd.isna(v) else f"{v:,.0f}")
    return show.to_string(index=False)
