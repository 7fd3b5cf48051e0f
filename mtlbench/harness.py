"""Sweeps: methods x tasks x sigma x seeds, resumable, one atomic result file per run."""
from __future__ import annotations

import dataclasses
import gc
import logging
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from mtlbench import results
from mtlbench.backbones import resolve_backbone
from mtlbench.config import RunConfig, make_config
from mtlbench.errors import MtlbenchError
from mtlbench.engine import build_method, execute, load_data
from mtlbench.method import count
from mtlbench.registry import METHODS

log = logging.getLogger(__name__)


def expand(base: RunConfig, methods: list[str], tasks: list[int], sigmas: list[float],
           seeds: list[int]) -> list[RunConfig]:
    """The fully resolved grid. Sigma is collapsed for methods that ignore it and the
    schedule falls back to the method's default where it does not apply, so nothing runs
    twice under two names."""
    classes = {name: METHODS.get(name) for name in methods}
    if base.schedule and not any(base.schedule in c.schedules for c in classes.values()):
        raise MtlbenchError(f"--schedule {base.schedule!r} applies to none of {', '.join(methods)}")
    _check_method_options(base, classes)
    for sigma in sigmas:
        if not 0.0 <= sigma <= 1.0:
            raise MtlbenchError(f"--sigma must be in [0, 1], got {sigma:g}")
    out, seen = [], set()
    for t in tasks:
        for seed in seeds:
            for name, cls in classes.items():
                schedule = base.schedule if base.schedule in cls.schedules else cls.schedules[0]
                fields = {f.name for f in dataclasses.fields(cls.config_class)}
                own = {k: v for k, v in base.method_options.items() if k in fields}
                for sigma in sigmas if cls.uses_sigma else [cls.fixed_sigma]:
                    cfg = dataclasses.replace(base, method=name, tasks=t, sigma=sigma, seed=seed,
                                              schedule=schedule, tr_impl=base.tr_impl if "impl" in fields else "",
                                              method_options=own)
                    if cfg.key() not in seen:
                        seen.add(cfg.key())
                        out.append(cfg)
    return out


def _check_method_options(base: RunConfig, classes: dict) -> None:
    """Each ``-o method.KEY=VALUE`` must be an option of at least one method in the sweep;
    it is given to those methods only, and checked by building their configs."""
    options = base.method_options
    for name in set(options) & {"sigma", "schedule"}:
        raise MtlbenchError(f"set {name} with --{name}, not as -o method.{name}")
    known = {}
    for method, cls in classes.items():
        fields = {f.name for f in dataclasses.fields(cls.config_class)} - {"sigma", "schedule"}
        for f in fields:
            known.setdefault(f, []).append(method)
    unknown = sorted(set(options) - set(known))
    if unknown:
        valid = ", ".join(f"{k} ({'/'.join(v)})" for k, v in sorted(known.items())) or \
            "none (these methods take no method options)"
        raise MtlbenchError(f"unknown method option(s) {', '.join(unknown)} for {', '.join(classes)}; "
                            f"valid: {valid}")
    for method, cls in classes.items():
        own = {k: v for k, v in options.items() if method in known.get(k, [])}
        if own:  # a value of the wrong type or an unknown choice fails now, before any run
            config = make_config(cls.config_class, {**own, "schedule": cls.schedules[0]}, f"method {method!r}")
            with torch.device("meta"):
                cls(resolve_backbone(base.backbone, 3, base.backbone_options), 2, config)


def estimate_params(cfg: RunConfig, in_channels: int) -> int:
    """Trainable parameters of ``cfg``'s model, counted on the meta device (no memory used)."""
    with torch.device("meta"):
        return count(build_method(cfg, in_channels))


class Sweep:
    """Runs configurations into ``out``; finished runs (same config hash) are skipped."""

    def __init__(self, out: Path, max_params: int, warn: Callable[[str], None] = print,
                 data_root: str | None = None, command: str = "", download: bool = False) -> None:
        self.out, self.max_params, self.warn, self.data_root = Path(out), max_params, warn, data_root
        self.command, self.download = command, download
        results.check_writable(self.out)
        self._data: dict[str, tuple] = {}

    def finished(self) -> dict[str, dict]:
        return {r["key"]: r for r in results.load_runs(self.out, warn=self.warn)
                if r.get("status") in ("ok", "skipped")}

    def data(self, cfg: RunConfig) -> tuple:
        key = repr((cfg.dataset, sorted(cfg.dataset_options.items()), cfg.tasks, cfg.task_names,
                    cfg.holdout, cfg.holdout_split))
        if key not in self._data:
            self._data = {key: load_data(cfg, self.data_root, self.download)}  # keep one: sweeps go T by T
        return self._data[key]

    def run(self, configs: list[RunConfig]) -> list[dict]:
        done = self.finished()
        todo = [c for c in configs if c.key() not in done]
        if len(todo) < len(configs):
            self.warn(f"mtlbench: {len(configs) - len(todo)} of {len(configs)} runs already finished "
                      f"in {self.out}; skipping them")
        for cfg in todo:
            done[cfg.key()] = self.run_one(cfg)
        return [done[c.key()] for c in configs]

    def run_one(self, cfg: RunConfig) -> dict:
        train_set, test_set = self.data(cfg)
        result = {"schema": results.SCHEMA, "key": cfg.key(), "config": cfg.to_dict(), "command": self.command,
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "environment": results.environment()}
        start = time.perf_counter()
        params = estimate_params(cfg, train_set.images.shape[1])
        if params > self.max_params:
            result.update(status="skipped", reason=f"{params:,} trainable parameters exceed "
                          f"--max-params {self.max_params:,}", params={"trainable": params})
        else:
            result.update(self._attempt(cfg, train_set, test_set))
        result["wall_seconds"] = time.perf_counter() - start
        results.write_json_atomic(self._free_path(result), result)
        return result

    def _free_path(self, result: dict) -> Path:
        """The run's file name, unless an unreadable file holds it: that is never overwritten."""
        path = self.out / "runs" / results.run_filename(result)
        n = 1
        while path.exists() and results.read_run(path) is None:
            self.warn(f"mtlbench: {path.name} exists but is not a valid run file; leaving it alone")
            path = path.with_name(f"{path.stem}.{n}.json")
            n += 1
        return path

    def _attempt(self, cfg: RunConfig, train_set, test_set) -> dict:
        label = f"{cfg.method} T={cfg.tasks}" + (f" sigma={cfg.sigma:g}" if cfg.sigma is not None else "") + \
            f" seed={cfg.seed}"
        total = METHODS.get(cfg.method).total_steps(cfg.tasks, cfg.steps_per_task, cfg.schedule)
        with tqdm(total=total, desc=label, leave=False, unit="step", dynamic_ncols=True) as bar:
            try:
                return {"status": "ok", **execute(cfg, train_set, test_set, bar.update)}
            except MtlbenchError:
                raise  # bad input: one line and exit 2, not a failed run
            except Exception as exc:
                # Out of memory, a non-finite loss, a kernel failure, a plugin's bug: record it
                # and go on with the sweep.
                log.debug("run failed", exc_info=True)
                self.warn(f"mtlbench: {label} failed: {type(exc).__name__}: {str(exc).splitlines()[0]}")
                return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc()}
            finally:
                gc.collect()
