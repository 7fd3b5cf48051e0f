"""Results: one JSON file per run (the source of truth), and tables derived from them.

Run files are written atomically (temporary file, fsync, rename), so a sweep killed at any
moment leaves either a whole result or none. The table has a fixed, declared column list.
"""
from __future__ import annotations

import functools
import json
import math
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mtlbench.errors import MtlbenchError

SCHEMA = "mtlbench.run/1"

COLUMNS = [
    "key", "status", "method", "dataset", "backbone", "tasks", "sigma", "schedule", "seed",
    "steps_per_task", "batch_size", "lr", "mean_accuracy", "mean_balanced_accuracy",
    "delta_m_accuracy", "delta_m_balanced_accuracy", "params_trainable", "params_shared",
    "params_task_specific", "flops_forward_per_image_task", "flops_train_per_pair",
    "train_seconds", "train_pairs_per_s", "eval_images_per_s", "peak_memory_mb",
    "wall_seconds", "device", "precision", "threads", "reason",
]

# Runs are compared with stl only when everything but the method (and sigma) matches.
MATCH_KEYS = ["dataset", "dataset_options", "backbone", "backbone_options", "tasks", "seed",
              "steps_per_task", "batch_size", "lr", "optimizer", "precision"]


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
            "git_commit": _git_commit()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def run_filename(result: dict) -> str:
    c = result["config"]
    sigma = "na" if c["sigma"] is None else f"{c['sigma']:g}"
    return f"{c['method']}_T{c['tasks']}_sigma{sigma}_seed{c['seed']}_{result['key']}.json"


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
    """Fail early, before any training, if results cannot be written under ``out``."""
    try:
        (out / "runs").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out / "runs"):
            pass
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


def read_run(path: Path, warn=lambda msg: None) -> dict | None:
    """A run file's content, or None (with a warning) for a corrupt or foreign file."""
    try:
        obj = json.loads(Path(path).read_text())
        if not isinstance(obj, dict) or obj.get("schema") != SCHEMA or "config" not in obj or "key" not in obj:
            raise ValueError("not an mtlbench run file")
        return obj
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        warn(f"mtlbench: skipping {Path(path).name}: {exc}")
        return None


def _row(run: dict) -> dict:
    c, m = run["config"], run.get("metrics", {})
    p, tr, ev = run.get("params", {}), run.get("train", {}), run.get("eval", {})
    env, fl, mem = run.get("environment", {}), run.get("flops", {}), run.get("memory", {})
    return {"key": run["key"], "status": run.get("status", "ok"), **{k: c.get(k) for k in (
        "method", "dataset", "backbone", "tasks", "sigma", "schedule", "seed", "steps_per_task",
        "batch_size", "lr")},
        "mean_accuracy": m.get("mean_accuracy"), "mean_balanced_accuracy": m.get("mean_balanced_accuracy"),
        "params_trainable": p.get("trainable"), "params_shared": p.get("shared"),
        "params_task_specific": p.get("task_specific"),
        "flops_forward_per_image_task": fl.get("forward_per_image_task"),
        "flops_train_per_pair": fl.get("train_per_pair"), "train_seconds": tr.get("seconds"),
        "peak_memory_mb": mem["peak_bytes"] / 2**20 if mem.get("peak_bytes") else None,
        "train_pairs_per_s": tr.get("pairs_per_s"), "eval_images_per_s": ev.get("images_per_s"),
        "wall_seconds": run.get("wall_seconds"), "device": c.get("device"),
        "precision": c.get("precision", "fp32"),
        "threads": env.get("threads"), "reason": run.get("reason")}


def match_key(config: dict) -> str:
    return json.dumps({k: config.get(k) for k in MATCH_KEYS}, sort_keys=True)


def delta_m(values: list[float], reference: list[float]) -> float:
    """Mean over tasks of 100 * (m - m_stl) / m_stl; positive is better."""
    v, r = np.asarray(values, float), np.asarray(reference, float)
    return float(np.mean(100.0 * (v - r) / r))


def add_delta_m(runs: list[dict]) -> None:
    """Fill ``delta_m`` in each ok run from the stl run with the same data, T, seed and budget."""
    stl = {match_key(r["config"]): r["metrics"] for r in runs
           if r["config"]["method"] == "stl" and r.get("status") == "ok"}
    for r in runs:
        ref = stl.get(match_key(r["config"]))
        ok = ref is not None and r.get("status") == "ok"
        r["delta_m"] = {name: delta_m(r["metrics"][name], ref[name]) if ok else None
                        for name in ("accuracy", "balanced_accuracy")}


def table(runs: list[dict]) -> pd.DataFrame:
    """One row per run, with exactly :data:`COLUMNS`."""
    add_delta_m(runs)
    rows = []
    for run in runs:
        row = _row(run)
        row["delta_m_accuracy"] = run["delta_m"]["accuracy"]
        row["delta_m_balanced_accuracy"] = run["delta_m"]["balanced_accuracy"]
        rows.append(row)
    df = pd.DataFrame(rows, columns=COLUMNS)
    return df.sort_values(["dataset", "tasks", "method", "sigma", "seed"], na_position="first",
                          kind="stable").reset_index(drop=True)


def write_tables(folder: Path, df: pd.DataFrame) -> None:
    """``results.csv`` (and ``results.parquet``), atomically replaced."""
    for name, writer in (("results.csv", lambda p: df.to_csv(p, index=False)),
                         ("results.parquet", lambda p: df.to_parquet(p, index=False))):
        tmp = folder / f".tmp-{name}"
        writer(tmp)
        os.replace(tmp, folder / name)


def summary(df: pd.DataFrame) -> str:
    """The plain table printed at the end of ``mtlbench run``."""
    fmt = lambda v, spec: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)  # noqa: E731
    lines = []
    for _, r in df.iterrows():
        if r["status"] != "ok":
            lines.append([r["method"], fmt(r["sigma"], ".2f"), str(r["tasks"]), str(r["seed"]),
                          r["status"], "", "", "", "", "", "", str(r["reason"])[:60]])
            continue
        lines.append([r["method"], fmt(r["sigma"], ".2f"), str(r["tasks"]), str(r["seed"]),
                      fmt(100 * r["mean_accuracy"], ".2f"), fmt(100 * r["mean_balanced_accuracy"], ".2f"),
                      fmt(r["delta_m_accuracy"], "+.2f"), fmt(r["delta_m_balanced_accuracy"], "+.2f"),
                      f"{int(r['params_trainable']):,}", fmt(r["train_seconds"], ".1f"),
                      fmt(r["train_pairs_per_s"], ",.0f"), ""])
    head = ["method", "sigma", "tasks", "seed", "acc%", "bal_acc%", "dm_acc%", "dm_bal%",
            "params", "train_s", "pairs/s", "note"]
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(head)]
    render = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()  # noqa: E731
    return "\n".join([render(head)] + [render(l) for l in lines])
