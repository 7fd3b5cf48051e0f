"""Results: one JSON file per run (the source of truth), and tables derived from them.

Run files are written atomically (temporary file, fsync, rename), so a sweep killed at any
moment leaves either a whole result or none. The table has a fixed, declared column list.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import math
import os
import platform
import re
import subprocess
import tempfile
import unicodedata
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch

from mtlbench.config import as_now, reference_key, setting, setting_key
from mtlbench.errors import MtlbenchError
from mtlbench.registry import METHODS

SCHEMA = "mtlbench.run/2"  # run/1 files (before the training protocol and setting identity) are skipped

DELTA_M_METRICS = ("accuracy", "balanced_accuracy", "auroc", "ap")
HEADLINE = "balanced_accuracy"  # the metric reports lead with (one-vs-rest tasks are imbalanced)

COLUMNS = [
    "key", "setting", "reference", "status", "method", "label", "options", "dataset", "backbone", "tasks",
    "seed", "epochs", "steps_per_task", "batch_size", "lr", "lr_schedule", "pos_weight", "val_fraction",
    "mean_accuracy", "mean_balanced_accuracy", "mean_auroc", "mean_ap",
    "final_mean_accuracy", "final_mean_balanced_accuracy", "final_mean_auroc", "final_mean_ap",
    "val_mean_balanced_accuracy", "best_step", "steps", "stopped_early",
    "delta_m_accuracy", "delta_m_balanced_accuracy", "delta_m_auroc", "delta_m_ap",
    "params_trainable", "params_shared", "params_task_specific", "flops_forward_per_image_task",
    "flops_train_per_pair", "train_seconds", "step_seconds", "train_pairs_per_s", "eval_images_per_s",
    "peak_memory_mb",
    "wall_seconds", "device", "precision", "threads", "reason", "setting_config",
]

@functools.lru_cache(maxsize=1)
def environment() -> dict:
    """Package versions, processor, accelerator, thread count and git commit."""
    import torchvision
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "torchvision": torchvision.__version__, "numpy": np.__version__, "pandas": pd.__version__}
    try:
        import timm
        versions["timm"] = timm.__version__
    except ImportError:
        pass
    from mtlbench import __version__
    versions["mtlbench"] = __version__
    return {"versions": versions, "platform": platform.platform(), "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "git_commit": git_commit()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def run_filename(result: dict) -> str:
    c = result["config"]
    label = "".join(ch if ch.isascii() else unicodedata.name(ch, "_").split()[-1].lower()
                    for ch in result.get("label") or c["method"])
    label = re.sub(r"[^A-Za-z0-9.=+-]+", "_", label).strip("_")
    return f"{label}_T{c['tasks']}_seed{c['seed']}_{result['key']}.json"


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write ``obj`` to ``path`` so that readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")  # never matches *.json
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, allow_nan=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(out: Path) -> None:
    """Fail early, before any training, if results cannot be written under ``out`` (the run
    files in ``runs/`` and the tables beside it)."""
    try:
        (out / "runs").mkdir(parents=True, exist_ok=True)
        for folder in (out / "runs", out):
            with tempfile.TemporaryFile(dir=folder):
                pass
        if not os.access(out, os.W_OK):  # root writes anywhere: the check above is the real one
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        raise MtlbenchError(f"cannot write results to {str(out)!r}: {exc.strerror or exc}") from None


def load_runs(folder: Path, warn=print) -> list[dict]:
    """Every valid run file under ``folder``; corrupt or foreign files are reported and skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MtlbenchError(f"results folder {str(folder)!r} does not exist")
    runs, seen = [], set()
    for path in sorted((folder / "runs").glob("*.json")) if (folder / "runs").is_dir() else []:
        obj = read_run(path, warn)
        if obj is not None and obj["key"] not in seen:  # one row per configuration
            seen.add(obj["key"])
            runs.append(obj)
    return runs


REQUIRED_CONFIG = ("method", "method_options", "tasks", "dataset", "seed")


def read_run(path: Path, warn=lambda msg: None) -> dict | None:
    """A run file's content, or None (with a warning) for a corrupt, foreign or older file."""
    try:
        obj = json.loads(Path(path).read_text())
        if not isinstance(obj, dict) or not str(obj.get("schema", "")).startswith("mtlbench.run/"):
            raise ValueError("not an mtlbench run file")
        if obj["schema"] != SCHEMA:
            raise ValueError(f"written by another mtlbench version ({obj['schema']}, this one reads {SCHEMA}); "
                             "rerun its command to get a comparable result")
        config = obj.get("config")
        if not isinstance(obj.get("key"), str) or not isinstance(config, dict) or \
                any(k not in config for k in REQUIRED_CONFIG) or obj.get("status") not in ("ok", "failed", "skipped"):
            raise ValueError("an mtlbench run file with missing fields")
        if obj["status"] == "ok" and not isinstance(obj.get("metrics"), dict):
            raise ValueError("a finished run file without metrics")
        if isinstance(config["method_options"], dict):  # an older file reads as this version writes it
            as_now(config["method_options"])
            if config["method"] in METHODS:  # so one setting has one label
                obj["label"] = METHODS.get(config["method"]).label(config["method_options"])
        return obj
    except (ValueError, OSError, UnicodeDecodeError, KeyError, TypeError) as exc:
        warn(f"mtlbench: skipping {Path(path).name}: {exc}")
        return None


def _row(run: dict) -> dict:
    c = run["config"]
    m, fin, val = run.get("metrics", {}), run.get("metrics_final", {}), run.get("train", {}).get("selection") or {}
    p, tr, ev = run.get("params", {}), run.get("train", {}), run.get("eval", {})
    env, fl, mem = run.get("environment", {}), run.get("flops", {}), run.get("memory", {})
    return {"key": run["key"], "setting": setting_key(c), "reference": reference_key(c),
            "status": run.get("status", "ok"), "label": run.get("label") or c.get("method"),
            "options": json.dumps(c.get("method_options", {}), sort_keys=True),
            **{k: c.get(k) for k in ("method", "dataset", "backbone", "tasks", "seed", "epochs", "steps_per_task",
                                     "batch_size", "lr", "lr_schedule", "pos_weight", "val_fraction")},
            **{f"mean_{k}": m.get(f"mean_{k}") for k in DELTA_M_METRICS},
            **{f"final_mean_{k}": fin.get(f"mean_{k}") for k in DELTA_M_METRICS},
            "val_mean_balanced_accuracy": val.get("best_value"), "best_step": val.get("best_step"),
            "steps": tr.get("steps"), "stopped_early": bool(tr.get("stopped_early")) if tr else None,
            "params_trainable": p.get("trainable"), "params_shared": p.get("shared"),
            "params_task_specific": p.get("task_specific"),
            "flops_forward_per_image_task": fl.get("forward_per_image_task"),
            "flops_train_per_pair": fl.get("train_per_pair"), "train_seconds": tr.get("seconds"),
            "peak_memory_mb": mem["peak_bytes"] / 2**20 if mem.get("peak_bytes") else None,
            "step_seconds": (tr.get("step_time") or {}).get("median_s") or (run.get("probe") or {}).get(
                "probe_step_seconds"),
            "train_pairs_per_s": tr.get("pairs_per_s") or _probe_rate(run),
            "eval_images_per_s": ev.get("images_per_s"),
            "wall_seconds": run.get("wall_seconds"), "device": c.get("device"), "precision": c.get("precision"),
            "threads": env.get("threads"), "reason": run.get("reason"),
            "setting_config": json.dumps(setting(c), sort_keys=True)}


def _probe_rate(run: dict) -> float | None:
    """Pairs per second of a run skipped on its time budget, from its probe steps."""
    probe, c = run.get("probe") or {}, run["config"]
    if not probe.get("probe_step_seconds"):
        return None
    schedule = c.get("method_options", {}).get("schedule", "")
    from mtlbench.method import SCHEDULES
    tasks = c["tasks"] if schedule in SCHEDULES and SCHEDULES[schedule].many_tasks_per_step else 1
    return c["batch_size"] * tasks / probe["probe_step_seconds"]


def delta_m(values: list[float], reference: list[float]) -> float:
    """Mean over tasks of 100 * (m - m_ref) / m_ref; positive is better (tasks where the metric
    is undefined, e.g. AUROC without positives, are left out)."""
    v, r = np.asarray(values, float), np.asarray(reference, float)
    rel = 100.0 * (v - r) / r
    return float(np.nanmean(rel)) if np.isfinite(rel).any() else math.nan


def add_delta_m(runs: list[dict], ignore: tuple[str, ...] = ()) -> None:
    """Fill ``delta_m`` (every metric of :data:`DELTA_M_METRICS`) in each ok run against the
    registry's reference method run in the same setting (``mtlbench.config.reference_key``;
    options in ``ignore`` were tuned on validation and may differ) and of the same seed, or
    the reference's mean over its seeds when that seed has no reference run."""
    ref_method = METHODS.reference
    ignore = tuple(n for n in ignore if not n.startswith("method."))
    refs: dict[str, dict[int, dict]] = {}  # reference key -> seed -> metrics
    for r in runs:
        if r["config"]["method"] == ref_method and r.get("status") == "ok":
            refs.setdefault(reference_key(r["config"], ignore), {})[r["config"]["seed"]] = r["metrics"]
    for r in runs:
        ref = _reference_metrics(refs.get(reference_key(r["config"], ignore)), r["config"]["seed"])
        ok = ref is not None and r.get("status") == "ok"
        r["delta_m"] = {name: delta_m(r["metrics"][name], ref[name]) if ok and name in ref and name in r["metrics"]
                        else None for name in DELTA_M_METRICS}


def _reference_metrics(by_seed: dict[int, dict] | None, seed: int) -> dict | None:
    """The reference run of the same seed; without one, the per-task mean over its seeds."""
    if not by_seed:
        return None
    if seed in by_seed:
        return by_seed[seed]
    out = {}
    for name in DELTA_M_METRICS:
        values = [m[name] for m in by_seed.values() if name in m]
        if values and len({len(v) for v in values}) == 1:
            out[name] = np.nanmean(np.asarray(values, float), axis=0).tolist()
    return out


def table(runs: list[dict], ignore: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per run, with exactly :data:`COLUMNS` (``ignore``: see :func:`add_delta_m`)."""
    add_delta_m(runs, ignore)
    rows = []
    for run in runs:
        row = _row(run)
        for name in DELTA_M_METRICS:
            row[f"delta_m_{name}"] = run["delta_m"][name]
        rows.append(row)
    df = pd.DataFrame(rows, columns=COLUMNS)
    return df.sort_values(["dataset", "tasks", "label", "seed"], na_position="first",
                          kind="stable").reset_index(drop=True)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if needed), held for the ``with`` block."""
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def refresh_tables(folder: Path, warn=print) -> pd.DataFrame:
    """Rebuild ``results.csv`` and ``results.parquet`` from the run files on disk now.

    Under a lock, so that writers queue and each writes what is on disk at its turn (an older
    snapshot can never replace a newer one); through unique temporary names, each replaced
    atomically; leftovers of writers killed mid-way are removed first. The two files are
    replaced one after the other: a kill between the two leaves the CSV one rebuild ahead,
    until the next refresh (every ``mtlbench run`` starts and ends with one)."""
    folder = Path(folder)
    with locked(folder / ".tables.lock"):
        for orphan in folder.glob(".tmp-results*"):
            orphan.unlink(missing_ok=True)
        df = table(load_runs(folder, warn=warn))
        for name, writer in (("results.parquet", lambda p: df.to_parquet(p, index=False)),
                             ("results.csv", lambda p: df.to_csv(p, index=False))):
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-results-", suffix=".part")
            os.close(fd)
            try:
                writer(tmp)
                os.replace(tmp, folder / name)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    return df


def summary(df: pd.DataFrame) -> str:
    """The plain table printed at the end of ``mtlbench run``."""
    fmt = lambda v, spec: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)  # noqa: E731
    lines = []
    for _, r in df.iterrows():
        if r["status"] != "ok":
            lines.append([r["label"], str(r["tasks"]), str(r["seed"]), r["status"], "", "", "", "", "", "", "",
                          str(r["reason"])[:60]])
            continue
        lines.append([r["label"], str(r["tasks"]), str(r["seed"]),
                      fmt(100 * r["mean_accuracy"], ".2f"), fmt(100 * r["mean_balanced_accuracy"], ".2f"),
                      fmt(100 * r["mean_auroc"], ".2f"), fmt(r["delta_m_balanced_accuracy"], "+.2f"),
                      f"{int(r['params_trainable']):,}", fmt(r["train_seconds"], ".1f"),
                      fmt(r["train_pairs_per_s"], ",.0f"), str(int(r["best_step"])) + "/" + str(int(r["steps"]))
                      if not pd.isna(r["best_step"]) else "final",
                      "stopped early" if r["stopped_early"] else ""])
    head = ["method", "tasks", "seed", "acc%", "bal_acc%", "auroc%", "dm_bal%", "params", "train_s", "pairs/s",
            "best_step", "note"]
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(head)]
    render = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()  # noqa: E731
    return "\n".join([render(head)] + [render(l) for l in lines])
