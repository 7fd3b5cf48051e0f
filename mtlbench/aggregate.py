"""Aggregation across seeds, and selection on validation.

Runs are grouped by their setting (:func:`mtlbench.config.setting_key`: the configuration
minus the seed), and each metric gets the mean and the 95% confidence interval across seeds.

``select_val``: when a sweep tries several values of some options (``--lr 1e-3,3e-3``, or a
method option), each method and setting keeps the value whose mean validation score (the
selection metric of the best checkpoint, over seeds) is best, and reports that value's test
scores. The test split never takes part in the choice.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from mtlbench.config import digest
from mtlbench.errors import MtlbenchError

# Two-sided 95% critical values of Student's t for 1..30 degrees of freedom (standard
# tables, e.g. NIST/SEMATECH e-Handbook of Statistical Methods, table 1.3.6.7.2).
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
       2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
       2.060, 2.056, 2.052, 2.048, 2.045, 2.042]

# Columns that describe a setting (the same for every run of it), carried into the aggregate.
DESCRIBE = ["dataset", "backbone", "method", "label", "options", "tasks", "epochs", "steps_per_task",
            "batch_size", "lr", "lr_schedule", "pos_weight", "val_fraction", "device", "precision"]
METRICS = ["mean_accuracy", "mean_balanced_accuracy", "mean_auroc", "mean_ap",
           "final_mean_accuracy", "final_mean_balanced_accuracy", "final_mean_auroc", "final_mean_ap",
           "val_mean_balanced_accuracy", "delta_m_accuracy", "delta_m_balanced_accuracy", "delta_m_auroc",
           "delta_m_ap", "params_trainable", "flops_forward_per_image_task", "flops_train_per_pair",
           "step_seconds", "train_pairs_per_s", "eval_images_per_s", "peak_memory_mb", "wall_seconds"]
SELECT_BY = "val_mean_balanced_accuracy"


def ci95(values) -> float:
    """Half-width of the 95% t-interval of the mean; NaN for fewer than two values."""
    v = np.asarray([x for x in values if x is not None and not pd.isna(x)], dtype=float)
    if len(v) < 2:
        return math.nan
    t = T95[len(v) - 2] if len(v) - 1 <= len(T95) else 1.96
    return float(t * v.std(ddof=1) / math.sqrt(len(v)))


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """One row per setting of the ok runs: the describing columns, ``seeds``, ``runs``, and
    ``<metric>_mean`` and ``<metric>_ci95`` for every metric across seeds. Runs of one setting
    and seed (implementations tested to give the same numbers) are averaged first, so each
    seed counts once. Runs skipped on their time budget after timed probe steps count for
    the cost metrics (step time, throughput, memory) and are marked ``measured_only``."""
    probed = (df["status"] == "skipped") & df["step_seconds"].notna() if "step_seconds" in df else False
    ok = df[(df["status"] == "ok") | probed]
    extra = [c for c in ("tuned_group", "tuned_over", "tuned_values", "chosen") if c in df.columns]
    rows = []
    for setting, group in ok.groupby("setting", sort=False):
        first = group.iloc[0]
        row = {"setting": setting, **{c: first.get(c) for c in DESCRIBE + extra}}
        row["seeds"], row["runs"] = int(group["seed"].nunique()), len(group)
        row["measured_only"] = bool((group["status"] != "ok").all())
        for m in METRICS:
            values = pd.to_numeric(group[m], errors="coerce").groupby(group["seed"]).mean() if m in group \
                else pd.Series([math.nan])
            row[f"{m}_mean"] = values.mean() if values.notna().any() else math.nan
            row[f"{m}_ci95"] = ci95(values)
        rows.append(row)
    cols = ["setting", *DESCRIBE, *extra, "seeds", "runs", "measured_only"] + \
        [f"{m}_{s}" for m in METRICS for s in ("mean", "ci95")]
    out = pd.DataFrame(rows, columns=cols)
    return out.sort_values(["dataset", "tasks", "label"], kind="stable").reset_index(drop=True)


def option_value(options_json: str, name: str):
    """A method option of a table row (its ``options`` column holds them as JSON)."""
    try:
        return json.loads(options_json).get(name)
    except (TypeError, ValueError):
        return None


def tuned_group(setting_json: str, tune: list[str]) -> str:
    """The setting with the tuned options left out: runs that differ only in those share it.
    ``tune`` names run options (``lr``) or method options (``method.sigma``)."""
    config = json.loads(setting_json)
    for name in tune:
        if name.startswith("method."):
            config.get("method_options", {}).pop(name.split(".", 1)[1], None)
        else:
            config.pop(name, None)
    return digest(config)


def tuned_values(setting_json: str, tune: list[str]) -> dict:
    config = json.loads(setting_json)
    return {name: (config.get("method_options", {}).get(name.split(".", 1)[1]) if name.startswith("method.")
                   else config.get(name)) for name in tune}


def select_val(df: pd.DataFrame, tune: list[str]) -> pd.DataFrame:
    """The runs of the settings chosen on validation: per method and setting (tuned options
    left out), the values of ``tune`` with the best mean validation score over seeds. Adds
    ``tuned_group`` (the setting without the tuned options), ``tuned_over`` (how many values
    were tried), ``tuned_values`` (which) and ``chosen``."""
    if "setting_config" not in df.columns:
        raise MtlbenchError("--select val needs a table written by this mtlbench version (setting_config column) "
                            "or a results folder")
    ok = df[df["status"] == "ok"].copy()
    if ok[SELECT_BY].isna().all():
        raise MtlbenchError("--select val needs runs with a validation split (--val-fraction > 0)")
    ok["group"] = [tuned_group(s, tune) for s in ok["setting_config"]]
    scores = ok.groupby("setting").agg(group=("group", "first"), score=(SELECT_BY, "mean"),
                                       config=("setting_config", "first"))
    chosen, info = [], {}
    for group, settings in scores.groupby("group", sort=False):
        tried = [json.dumps(tuned_values(c, tune), sort_keys=True) for c in settings["config"]]
        best = settings["score"].idxmax() if settings["score"].notna().any() else settings.index[0]
        chosen.append(best)
        info[best] = (len(settings), "; ".join(sorted(set(tried))), json.dumps(tuned_values(settings.loc[best, "config"],
                                                                                           tune), sort_keys=True))
    out = ok[ok["setting"].isin(chosen)].rename(columns={"group": "tuned_group"}).copy()
    out["tuned_over"] = [info[s][0] for s in out["setting"]]
    out["tuned_values"] = [info[s][1] for s in out["setting"]]
    out["chosen"] = [info[s][2] for s in out["setting"]]
    return out


def _flat(setting_json: str) -> dict:
    """A setting's configuration as flat ``name -> value`` (dataset options as ``dataset.KEY``)."""
    out = {}
    for key, value in json.loads(setting_json).items():
        if isinstance(value, dict) and key.endswith("_options"):
            out.update({f"{key[:-len('_options')]}.{k}": v for k, v in value.items()})
        elif key not in ("method", "method_options"):  # the label already names these
            out[key] = value
    return out


def distinct_labels(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with each label made unique per setting: where runs of one label and T come from
    settings that differ in more than the method (a sweep of a dataset option, say), the
    options that differ are appended (``hard noisy_fraction=0.25``)."""
    df = df.copy()
    for _, group in df.groupby(["label", "tasks"], sort=False):
        settings = group.drop_duplicates("setting")
        if len(settings) < 2:
            continue
        flats = {s: _flat(c) for s, c in zip(settings["setting"], settings["setting_config"])}
        keys = sorted({k for f in flats.values() for k in f})
        differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flats.values()}) > 1]
        for s, flat in flats.items():
            suffix = " ".join(f"{k.split('.', 1)[-1]}={flat.get(k)}" for k in differ)
            rows = group.index[group["setting"] == s]
            df.loc[rows, "label"] = df.loc[rows, "label"] + " " + suffix
    return df
