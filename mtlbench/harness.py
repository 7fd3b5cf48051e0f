"""Sweeps: methods x method-option axes x tasks x learning rates x seeds, resumable, one
atomic result file per run."""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import json
import logging
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from mtlbench import results
from mtlbench.backbones import resolve_backbone
from mtlbench.checkpoint import RunCheckpoint
from mtlbench.config import RunConfig, setting_key
from mtlbench.engine import OverBudget, build_method, execute, load_data, make_budget, resolve_budget
from mtlbench.errors import MtlbenchError
from mtlbench.method import SCHEDULES, count
from mtlbench.registry import METHODS, WEIGHTINGS

log = logging.getLogger(__name__)


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def expand(base: RunConfig, methods: list[str], tasks: list[int], seeds: list[int],
           axes: dict[str, list] | None = None, lrs: list[float] | None = None,
           weighting_options: dict | None = None) -> list[RunConfig]:
    """The fully resolved grid.

    ``base.method_options`` holds single method options (``-o method.KEY=VALUE``, and the
    shorthands ``--schedule``, ``--tr-impl``): each goes to the methods that have it (a
    schedule only where the method supports it). ``axes`` maps a method option to a list of
    values swept for the methods that have it (``--sigma``, ``--weighting``); a method without
    it runs once. A weighting other than ``ew`` applies to methods whose schedule supervises
    several tasks per step; ``weighting_options`` (``-o weighting.KEY=VALUE``) go to the
    weightings that have them. Nothing runs twice under two names.
    """
    axes, lrs, weighting_options = dict(axes or {}), lrs or [base.lr], dict(weighting_options or {})
    classes = {name: METHODS.get(name) for name in methods}
    given = dict(base.method_options)
    known = {f for cls in classes.values() for f in _fields(cls.options_class)}
    unknown = sorted(set(given) - known - {"weighting", "weighting_options"})
    if unknown:
        valid = ", ".join(f"{f} ({'/'.join(m for m, c in classes.items() if f in _fields(c.options_class))})"
                          for f in sorted(known - {"schedule", "weighting", "weighting_options"})) or "none"
        raise MtlbenchError(f"unknown method option(s) {', '.join(unknown)} for {', '.join(classes)}; valid: {valid}")
    schedule = given.get("schedule")
    if schedule and not any(schedule in c.schedules for c in classes.values()):
        raise MtlbenchError(f"--schedule {schedule!r} applies to none of {', '.join(methods)}")
    _check_weightings(classes, given, axes.get("weighting", []), weighting_options)
    if "stream" in given and not any(
            SCHEDULES[schedule if schedule in c.schedules else c.schedules[0]].streams for c in classes.values()):
        raise MtlbenchError(f"method option stream applies to the sample schedule; none of {', '.join(classes)} "
                            "runs it")
    out, seen = [], set()
    base = resolve_budget(base)
    for name, cls in classes.items():
        fields = _fields(cls.options_class)
        own = {k: v for k, v in given.items() if k in fields and k != "schedule"}
        if schedule and schedule in cls.schedules:
            own["schedule"] = schedule
        many = SCHEDULES[own.get("schedule") or cls.schedules[0]].many_tasks_per_step
        method_axes = {k: v for k, v in axes.items() if k in fields and (k != "weighting" or many)}
        grid = [dict(zip(method_axes, values)) for values in itertools.product(*method_axes.values())]
        for point in grid:
            options = {**own, **point}
            if "weighting" in options:
                wcls = WEIGHTINGS.get(options["weighting"])
                options["weighting_options"] = {k: v for k, v in weighting_options.items()
                                                if k in _fields(wcls.options_class)}
            resolved = cls.resolve_options(options)
            _check_builds(cls, base, resolved)
            for t, lr, seed in itertools.product(tasks, lrs, seeds):
                cfg = dataclasses.replace(base, method=name, tasks=t, seed=seed, lr=lr, method_options=resolved)
                if cfg.key() not in seen:
                    seen.add(cfg.key())
                    out.append(cfg)
    order = {t: i for i, t in enumerate(tasks)}
    return sorted(out, key=lambda c: order[c.tasks])  # sweeps go T by T (one dataset in memory)


def _check_weightings(classes: dict, given: dict, names: list[str], options: dict) -> None:
    """Every weighting exists; one other than ``ew`` and every weighting option apply to some
    method of the sweep."""
    for name in names:
        WEIGHTINGS.get(name)
    takers = [m for m, c in classes.items() if "weighting" in _fields(c.options_class) and
              SCHEDULES[given.get("schedule") if given.get("schedule") in c.schedules else c.schedules[0]]
              .many_tasks_per_step]
    special = [n for n in names if n != "ew"]
    if special and not takers:
        raise MtlbenchError(f"--weighting {special[0]} needs a schedule that supervises several tasks per step; "
                            f"none of {', '.join(classes)} runs one (tr: add --schedule all)")
    if options:
        fields = set().union(*(_fields(WEIGHTINGS.get(n).options_class) for n in names or ["ew"]))
        unknown = sorted(set(options) - fields)
        if unknown:
            raise MtlbenchError(f"unknown weighting option(s) {', '.join(unknown)} for {', '.join(names or ['ew'])}; "
                                f"valid: {', '.join(sorted(fields)) or 'none'}")
        for name in names:  # values of the wrong type fail now, before any run
            wcls = WEIGHTINGS.get(name)
            wcls.resolve_options({k: v for k, v in options.items() if k in _fields(wcls.options_class)})


def _check_builds(cls: type, base: RunConfig, resolved: dict) -> None:
    """Choices that depend on the backbone (a compact form, say) fail now, before any run."""
    with torch.device("meta"):
        cls(resolve_backbone(base.backbone, 3, base.backbone_options), 2, cls.options_from(resolved))


def _alive(pid) -> bool:
    """Whether process ``pid`` exists on this host."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def estimate_params(cfg: RunConfig, in_channels: int) -> int:
    """Trainable parameters of ``cfg``'s model, counted on the meta device (no memory used)."""
    with torch.device("meta"):
        return count(build_method(cfg, in_channels))


PARTIAL = ".partial"  # runs/.partial/KEY.pt: the training state of a run not finished yet
_DATA: dict[str, object] = {}  # one dataset per process (sweeps go T by T), kept between runs


def data_for(cfg: RunConfig, root: str | None, download: bool):
    key = repr((cfg.dataset, sorted(cfg.dataset_options.items()), cfg.tasks, cfg.task_names,
                cfg.holdout, cfg.holdout_split, cfg.val_fraction, root, download))
    if key not in _DATA:
        _DATA.clear()
        _DATA[key] = load_data(cfg, root, download)
    return _DATA[key]


def forget_data() -> None:
    _DATA.clear()


@dataclasses.dataclass
class Runner:
    """Builds, trains and evaluates one configuration and returns its result (it writes
    nothing). Picklable: the executors send it to their workers.

    Budgets: a setting with more than ``max_params`` trainable parameters, or (with
    ``max_train_seconds``) whose first timed steps project a longer training, is recorded as
    skipped with the reason and what was measured.

    Checkpoints: with ``checkpoint_dir``, a run saves its training state there at evaluation
    points at least ``checkpoint_every`` seconds apart, and resumes from a state saved by a
    run of the same key that was killed (:mod:`mtlbench.checkpoint`).
    """
    max_params: int
    data_root: str | None = None
    download: bool = False
    max_train_seconds: float | None = None
    command: str = ""
    checkpoint_dir: str | None = None
    checkpoint_every: float = 60.0

    def checkpoint(self, cfg: RunConfig) -> RunCheckpoint | None:
        if self.checkpoint_dir is None:
            return None
        return RunCheckpoint(Path(self.checkpoint_dir) / f"{cfg.key()}.pt", self.checkpoint_every)

    def budgets(self) -> dict:
        return {"max_params": self.max_params, "max_train_seconds": self.max_train_seconds}

    def envelope(self, cfg: RunConfig) -> dict:
        config = cfg.to_dict()
        return {"schema": results.SCHEMA, "key": cfg.key(), "setting": setting_key(config),
                "label": METHODS.get(cfg.method).label(cfg.method_options), "config": config,
                "command": self.command, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "host": socket.gethostname(), "environment": results.environment()}

    def __call__(self, cfg: RunConfig, progress: Callable[[int], None] | None = None) -> dict:
        result = self.envelope(cfg)
        start = time.perf_counter()
        data = data_for(cfg, self.data_root, self.download)
        try:
            params = estimate_params(cfg, data.train.images.shape[1])
        except MtlbenchError:
            raise
        except Exception as exc:  # a model that cannot be built: this run fails, the sweep goes on
            params = None
            result.update(status="failed", reason=f"building the model: {type(exc).__name__}: {exc}",
                          traceback=traceback.format_exc())
        if params is None:
            pass
        elif params > self.max_params:
            result.update(status="skipped", reason=f"{params:,} trainable parameters exceed "
                          f"--max-params {self.max_params:,}", params={"trainable": params}, budgets=self.budgets())
        else:
            result.update(self._attempt(cfg, data, progress))
        result["wall_seconds"] = time.perf_counter() - start
        return result

    def _attempt(self, cfg: RunConfig, data, progress) -> dict:
        try:
            return {"status": "ok", **execute(cfg, data, progress, self.max_train_seconds,
                                              checkpoint=self.checkpoint(cfg))}
        except MtlbenchError:
            raise  # bad input: one line and exit 2, not a failed run
        except OverBudget as over:
            return {"status": "skipped", "reason": str(over), "probe": {
                k: v for k, v in over.details.items() if k not in ("params", "flops")},
                "params": over.details["params"], "flops": over.details["flops"],
                "memory": {"peak_bytes": over.details["peak_memory_bytes"], "how": over.details["memory_how"]
                           + " (during the probe steps)"}, "budgets": self.budgets()}
        except Exception as exc:
            # Out of memory, a non-finite loss, a kernel failure, a plugin's bug: record it
            # and go on with the sweep.
            log.debug("run failed", exc_info=True)
            return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc()}
        finally:
            gc.collect()


class Progress:
    """One display for every executor: a bar over the runs to do, with runs done, running,
    failed and skipped, and the time left at the current rate."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.counts = {"done": 0, "running": 0, "failed": 0, "skipped": 0}
        self.bar = tqdm(total=total, unit="run", desc="runs", delay=0.5, dynamic_ncols=True,
                        disable=not enabled or not total, bar_format="{desc}: {n}/{total} |{bar}| [{elapsed}<{remaining} left]")
        self._show()

    def _show(self) -> None:
        self.bar.set_description_str("runs (" + ", ".join(f"{k} {v}" for k, v in self.counts.items()) + ")")

    def started(self) -> None:
        self.counts["running"] += 1
        self._show()

    def finished(self, status: str, was_running: bool = True) -> None:
        self.counts["running"] -= was_running
        self.counts[{"ok": "done", "failed": "failed"}.get(status, "skipped")] += 1
        self.bar.update(1)
        self._show()

    def note(self, message: str, warn: Callable[[str], None]) -> None:
        with tqdm.external_write_mode():
            warn(message)

    def close(self) -> None:
        self.bar.close()


@contextlib.contextmanager
def _step_bar(cfg: RunConfig):
    """The local executor's bar over one run's steps (its total known once the data is)."""
    cls = METHODS.get(cfg.method)
    label = f"{cls.label(cfg.method_options)} T={cfg.tasks} seed={cfg.seed}"
    with tqdm(total=None, desc=label, leave=False, unit="step", dynamic_ncols=True, position=1) as bar:
        def update(n: int) -> None:
            if bar.total is None and _DATA:
                data = next(iter(_DATA.values()))
                bar.total = cls.total_steps(cfg.tasks, make_budget(cfg, len(data.train)),
                                            cfg.method_options["schedule"])
            bar.update(n)
        yield update


class Sweep:
    """Runs configurations into ``out`` on an executor; finished runs (same config hash) are
    skipped, so a rerun resumes.

    The driver (this object) owns the store: it claims each run before it starts, so that two
    sweeps into one folder never train a run twice, writes every result file atomically when
    its run comes back, and rebuilds the tables at most every ``TABLES_EVERY`` seconds and at
    the end. A failed run is retried ``retries`` times in this sweep and written with a
    traceback file; a later sweep retries it again unless ``skip_failed``. A skipped run is
    tried again by a later sweep with a larger budget. With ``checkpoint_every`` (seconds; None
    for none), a run killed before it finished resumes inside its training, from the state
    it last saved in ``runs/.partial/`` (removed when its result is written).
    """

    TABLES_EVERY = 30.0

    def __init__(self, out: Path, max_params: int, warn: Callable[[str], None] = print,
                 data_root: str | None = None, command: str = "", download: bool = False,
                 max_train_seconds: float | None = None, executor=None, retries: int = 0,
                 skip_failed: bool = False, progress: bool = True, checkpoint_every: float | None = 60.0) -> None:
        self.out, self.warn = Path(out), warn
        partial = None if checkpoint_every is None else str((self.out / "runs" / PARTIAL).resolve())
        self.runner = Runner(max_params, data_root, download, max_train_seconds, command, partial,
                             checkpoint_every or 0.0)
        self.executor, self.retries, self.skip_failed, self.progress = executor, retries, skip_failed, progress
        self._held: set[str] = set()  # keys of the claims this sweep holds
        results.check_writable(self.out)

    def _keep(self, run: dict) -> bool:
        """A run on disk that this sweep does not run again."""
        status = run.get("status")
        return (status == "ok" or (status == "failed" and self.skip_failed)
                or (status == "skipped" and self._still_skipped(run)))

    def _still_skipped(self, run: dict) -> bool:
        """Skipped under budgets no larger than the current ones."""
        then = run.get("budgets") or {}
        for name, now in self.runner.budgets().items():
            before = then.get(name)
            if (before is None) != (now is None) or (now is not None and now > before):
                return False
        return True

    def _finished_one(self, key: str) -> dict | None:
        for path in (self.out / "runs").glob(f"*_{key}.json"):
            run = results.read_run(path)
            if run is not None and run["key"] == key and self._keep(run):
                return run
        return None

    def finished(self) -> dict[str, dict]:
        return {r["key"]: r for r in results.load_runs(self.out, warn=self.warn) if self._keep(r)}

    def run(self, configs: list[RunConfig]) -> list[dict]:
        from mtlbench.executors import LocalExecutor
        results.refresh_tables(self.out, warn=self.warn)  # mends tables a killed writer left behind
        done = self.finished()
        todo = [c for c in configs if c.key() not in done]
        if len(todo) < len(configs):
            self.warn(f"mtlbench: {len(configs) - len(todo)} of {len(configs)} runs already finished "
                      f"in {self.out}; skipping them")
        executor = self.executor or LocalExecutor(step_bar=_step_bar)
        if isinstance(executor, LocalExecutor):
            if executor.step_bar is None and self.progress:
                executor.step_bar = _step_bar
            if todo:  # missing dataset files: one line before any display (the data stays cached)
                data_for(todo[0], self.runner.data_root, self.runner.download)
        progress = Progress(len(todo), self.progress)
        pending, running, elsewhere = list(reversed(todo)), {}, []
        last = time.monotonic()
        try:
            while pending or running:
                while pending and len(running) < executor.slots:
                    cfg = pending.pop()
                    if not self.acquire(cfg.key()):  # another sweep into this folder is training it
                        elsewhere.append(cfg)
                        progress.finished("skipped", was_running=False)
                        continue
                    found = self._finished_one(cfg.key())  # finished by another sweep meanwhile
                    if found is not None:
                        self.release(cfg.key())
                        done[cfg.key()] = found
                        progress.finished(found["status"], was_running=False)
                        continue
                    if (self.out / "runs" / PARTIAL / f"{cfg.key()}.pt").exists():
                        label = METHODS.get(cfg.method).label(cfg.method_options)
                        progress.note(f"mtlbench: {label} T={cfg.tasks} seed={cfg.seed}: resuming from its "
                                      "checkpoint", self.warn)
                    running[executor.submit(self.runner, cfg)] = (cfg, 1)
                    progress.started()
                if not running:  # every run left is being trained elsewhere
                    continue
                for handle, (kind, value) in executor.wait(list(running)):
                    cfg, attempt = running.pop(handle)
                    if kind == "input-error":
                        self.release(cfg.key())
                        message, host = value
                        raise MtlbenchError(message if isinstance(executor, LocalExecutor) else f"{message} (on {host})")
                    result = value if "key" in value else {**self.runner.envelope(cfg), **value}
                    result.update(executor=executor.describe(), attempts=attempt)
                    label = f"{result['label']} T={cfg.tasks} seed={cfg.seed}"
                    if result["status"] == "failed" and attempt <= self.retries:
                        progress.note(f"mtlbench: {label} failed ({result['reason'].splitlines()[0]}); "
                                      f"retrying ({attempt} of {self.retries})", self.warn)
                        running[executor.submit(self.runner, cfg)] = (cfg, attempt + 1)
                        continue
                    if result["status"] != "ok":
                        progress.note(f"mtlbench: {label} {result['status']}: "
                                      f"{str(result.get('reason', '')).splitlines()[0] if result.get('reason') else ''}",
                                      self.warn)
                    self.record(result)
                    self.release(cfg.key())
                    done[cfg.key()] = result
                    progress.finished(result["status"])
                if time.monotonic() - last > self.TABLES_EVERY:  # a killed sweep leaves current tables
                    results.refresh_tables(self.out, warn=lambda m: None)
                    last = time.monotonic()
        except BaseException:
            progress.bar.leave = False  # the error's line alone
            executor.stop()
            for key in list(self._held):  # every claim still held, wherever the interrupt came
                self.release(key)
            with contextlib.suppress(Exception):
                results.refresh_tables(self.out, warn=lambda m: None)  # what finished, in the tables
            raise
        else:
            executor.close()
        finally:
            progress.close()
            if isinstance(executor, LocalExecutor):
                forget_data()
        if elsewhere:
            self.warn(f"mtlbench: {len(elsewhere)} run(s) were being trained by another sweep into {self.out}; "
                      "rerun this command once it has finished to collect them")
        return [done[c.key()] for c in configs if c.key() in done]

    def record(self, result: dict) -> Path:
        """Write a finished run's file (and, for a failed run, its traceback beside it)."""
        path = self._free_path(result)
        if result.get("status") == "failed" and result.get("traceback"):
            tb = path.with_name(path.stem + ".traceback.txt")
            tb.write_text(f"{result.get('reason', '')}\n\n{result['traceback']}")
            result["traceback_file"] = tb.name
        results.write_json_atomic(path, result)
        (self.out / "runs" / PARTIAL / f"{result['key']}.pt").unlink(missing_ok=True)  # its checkpoint
        return path

    def run_one(self, cfg: RunConfig) -> dict:
        """Train ``cfg`` here and write its result (no claim, no retry)."""
        result = self.runner(cfg)
        self.record(result)
        return result

    def _claim_path(self, key: str) -> Path:
        folder = self.out / "runs" / ".claims"
        folder.mkdir(exist_ok=True)
        return folder / f"{key}.claim"

    def acquire(self, key: str) -> bool:
        """Claim run ``key`` before it starts: a file holding this process's PID and host. A
        live claim of another process is respected (False); a dead one on this host is taken
        over."""
        path = self._claim_path(key)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    owner = json.loads(path.read_text())
                except (OSError, ValueError):
                    owner = {}
                if owner.get("host") == me["host"] and not _alive(owner.get("pid")):
                    path.unlink(missing_ok=True)  # its process is gone: take it over
                    continue
                return False
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._held.add(key)
            return True
        return False

    def release(self, key: str) -> None:
        self._claim_path(key).unlink(missing_ok=True)
        self._held.discard(key)

    @contextlib.contextmanager
    def claim(self, key: str) -> Iterator[bool]:
        """``acquire`` for the ``with`` block, released at its end."""
        mine = self.acquire(key)
        try:
            yield mine
        finally:
            if mine:
                self.release(key)

    def _free_path(self, result: dict) -> Path:
        """The run's file name, unless an unreadable file holds it: that is never overwritten."""
        path = self.out / "runs" / results.run_filename(result)
        n = 1
        while path.exists() and results.read_run(path) is None:
            self.warn(f"mtlbench: {path.name} exists but is not a valid run file; leaving it alone")
            path = path.with_name(f"{path.stem}.{n}.json")
            n += 1
        return path
