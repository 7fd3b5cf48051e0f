"""Where a sweep's runs execute: in this process, in a local process pool, or as Ray tasks.

Every executor runs the same function on a worker (``work``: build, train and evaluate one
configuration and return its result) and hands the result back to the driver, which claims
runs before they start and writes every result file and table (``harness.Sweep``). Workers
therefore write nothing: only the driver's machine needs the output folder, and a killed or
interrupted worker leaves nothing partial behind.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing
import os
import signal
import socket
import threading
import time
import traceback
from typing import Any, Callable, Iterable

from mtlbench.errors import MtlbenchError

EXECUTORS = ("local", "processes", "ray")


def work(runner, cfg, progress: Callable[[int], None] | None = None) -> tuple[str, Any]:
    """One run on a worker: ``("ok", result)``, or ``("input-error", (message, host))`` for bad
    input (a missing dataset on that machine, say), which stops the sweep with one line."""
    try:
        return "ok", runner(cfg, progress)
    except MtlbenchError as exc:
        return "input-error", (str(exc), socket.gethostname())


def _worker_init(threads: int) -> None:
    """A pool worker: ``threads`` torch threads, and SIGINT left to the driver (which stops
    the pool), so that Ctrl-C prints no traceback from every worker. A worker whose driver
    dies (SIGKILL, SIGTERM, a lost terminal) exits too, instead of training on to the end of a
    run whose result nobody will write."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True,
                     name="mtlbench-orphan-watch").start()
    import torch
    torch.set_num_threads(threads)


def _exit_with_parent(parent: int, every: float = 1.0) -> None:
    """Exit this process once its parent is gone (it is then re-parented, so the id changes)."""
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(1)


def _failed(reason: str, tb: str = "") -> tuple[str, dict]:
    return "ok", {"status": "failed", "reason": reason, "traceback": tb}


class Executor:
    """Runs ``work(runner, cfg)`` for submitted configurations. ``slots`` is how many may run
    at once (the driver claims a run only when a slot is free); ``wait`` blocks until at least
    one finishes and returns ``(handle, outcome)`` pairs, outcome as ``work`` returns it."""

    name = "local"
    slots = 1

    def describe(self) -> dict:
        return {"name": self.name}

    def submit(self, runner, cfg) -> Any:
        raise NotImplementedError

    def wait(self, handles: Iterable[Any]) -> list[tuple[Any, tuple[str, Any]]]:
        raise NotImplementedError

    def stop(self) -> None:
        """Cancel what has not finished (Ctrl-C or an error in the driver)."""

    def close(self) -> None:
        """Release the workers after a finished sweep."""


class LocalExecutor(Executor):
    """Sequential and in-process (the default); a run shows its steps as it trains."""

    def __init__(self, threads: int | None = None, step_bar: Callable | None = None) -> None:
        import torch
        self.threads, self.step_bar, self._queue, self._n = threads, step_bar, {}, 0
        self._before = torch.get_num_threads()  # restored at the end: the caller's process is ours
        if threads:
            torch.set_num_threads(threads)

    def describe(self) -> dict:
        import torch
        return {"name": self.name, "threads_per_run": torch.get_num_threads()}

    def submit(self, runner, cfg) -> Any:
        self._n += 1
        self._queue[self._n] = (runner, cfg)
        return self._n

    def wait(self, handles):
        handle = next(iter(handles))
        runner, cfg = self._queue.pop(handle)
        if self.step_bar is None:
            return [(handle, work(runner, cfg))]
        with self.step_bar(cfg) as update:
            return [(handle, work(runner, cfg, update))]

    def stop(self) -> None:
        self._queue.clear()
        self.close()

    def close(self) -> None:
        import torch
        torch.set_num_threads(self._before)


class ProcessExecutor(Executor):
    """A local pool of ``workers`` processes (spawned, so that no thread state is inherited),
    each with ``threads`` torch threads: by default the cores divided among the workers, so
    that the pool never oversubscribes the machine."""

    name = "processes"

    def __init__(self, workers: int, threads: int | None = None) -> None:
        if workers < 1:
            raise MtlbenchError(f"--workers must be at least 1, got {workers}")
        self.workers = workers
        self.threads = threads or max(1, (os.cpu_count() or 1) // workers)
        self.slots = workers
        self._pool = None

    def describe(self) -> dict:
        return {"name": self.name, "workers": self.workers, "threads_per_run": self.threads}

    def _ensure(self):
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_worker_init, initargs=(self.threads,))
        return self._pool

    def submit(self, runner, cfg):
        return self._ensure().submit(work, runner, cfg)

    def wait(self, handles):
        done, _ = cf.wait(list(handles), return_when=cf.FIRST_COMPLETED)
        out, broken = [], False
        for future in done:
            try:
                out.append((future, future.result()))
            except cf.process.BrokenProcessPool as exc:
                broken = True
                out.append((future, _failed(f"a worker process died (killed, or out of memory): {exc}")))
            except Exception as exc:  # noqa: BLE001  (unpicklable result, say)
                out.append((future, _failed(f"{type(exc).__name__}: {exc}", traceback.format_exc())))
        if broken:  # the pool is unusable: the next submission starts a new one
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        return out

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            for child in multiprocessing.active_children():
                child.terminate()
            self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _ray():
    try:
        import ray
    except ImportError:
        raise MtlbenchError("--executor ray needs Ray, an optional extra: pip install -e \".[ray]\" "
                            "(or pip install \"mtlbench[ray]\")") from None
    return ray


class RayExecutor(Executor):
    """Each run is a Ray task asking for ``cpus`` CPUs and ``gpus`` GPUs, so that Ray places
    it. ``address`` joins a running cluster (``auto``, or ``HOST:PORT`` of ``ray start
    --head``); without one a local Ray instance is started, and stopped at the end. Results
    come back to the driver, which writes them."""

    name = "ray"

    def __init__(self, address: str | None = None, cpus: int = 1, gpus: float = 0,
                 num_cpus: int | None = None) -> None:
        ray = self._ray = _ray()
        if cpus <= 0 or gpus < 0:
            raise MtlbenchError(f"--cpus-per-run must be positive and --gpus-per-run not negative, got {cpus}, {gpus}")
        self.address, self.cpus, self.gpus = address, cpus, gpus
        self._started = not ray.is_initialized()
        if self._started and address not in (None, "auto"):
            _reachable(address)
        if self._started:
            try:
                ray.init(address=address, num_cpus=num_cpus if address is None else None,
                         include_dashboard=False, logging_level="error", log_to_driver=True)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                where = f"the Ray cluster at {address}" if address else "a local Ray instance"
                raise MtlbenchError(f"could not start or join {where}: {str(exc).splitlines()[0]}") from None
        resources = ray.cluster_resources()
        fits = min(resources.get("CPU", 0) / cpus, resources.get("GPU", 0) / gpus if gpus else float("inf"))
        if fits < 1:
            self.close()
            raise MtlbenchError(f"a run asks for {cpus:g} CPU(s) and {gpus:g} GPU(s) but the Ray cluster has "
                                f"{resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} GPUs in all")
        self.slots = max(1, int(fits))  # claim only what the cluster can run at once
        self._remote = ray.remote(_ray_work).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
        self._runner_ref, self._inflight = None, set()

    def describe(self) -> dict:
        return {"name": self.name, "address": self.address or "local instance", "cpus_per_run": self.cpus,
                "gpus_per_run": self.gpus, "threads_per_run": max(1, int(self.cpus))}

    def submit(self, runner, cfg):
        if self._runner_ref is None:
            self._runner_ref = self._ray.put(runner)
        ref = self._remote.remote(self._runner_ref, cfg, max(1, int(self.cpus)))
        self._inflight.add(ref)
        return ref

    def wait(self, handles):
        ready, _ = self._ray.wait(list(handles), num_returns=1)
        out = []
        for ref in ready:
            self._inflight.discard(ref)
            try:
                out.append((ref, self._ray.get(ref)))
            except Exception as exc:  # noqa: BLE001  (a worker or node died, out of memory, ...)
                out.append((ref, _failed(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}",
                                         traceback.format_exc())))
        return out

    def stop(self) -> None:
        if self._started:
            self._ray.shutdown()  # a local instance stops with its workers; a cluster drops this job's tasks
        else:  # a connection the caller opened stays open: cancel what this sweep started
            for ref in self._inflight:  # (force=True can abort the driver in Ray 2.60: a race in Ray)
                with contextlib.suppress(Exception):
                    self._ray.cancel(ref)
        self._inflight.clear()
        self._runner_ref = None

    def close(self) -> None:
        self.stop()


def _reachable(address: str) -> None:
    """Fail in seconds, with one line, where Ray itself would retry for minutes."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise MtlbenchError(f"--ray-address takes auto or HOST:PORT (the head's address from ray start --head), "
                            f"got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise MtlbenchError(f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one with "
                            f"`ray start --head --port {port}` on {host}") from None


def _ray_work(runner, cfg, threads: int):
    import ray
    import torch
    torch.set_num_threads(threads)
    kind, value = work(runner, cfg)
    if kind == "ok":
        value["ray_node"] = ray.get_runtime_context().get_node_id()  # which node of the cluster trained it
    return kind, value


def make_executor(name: str, workers: int | None = None, threads: int | None = None,
                  ray_address: str | None = None, gpus: float | None = None,
                  step_bar: Callable | None = None) -> Executor:
    """The executor named on the command line, with its options checked."""
    if name not in EXECUTORS:
        raise MtlbenchError(f"--executor must be one of {', '.join(EXECUTORS)}, got {name!r}")
    if workers is not None and name != "processes":
        raise MtlbenchError("--workers applies to --executor processes")
    if ray_address is not None and name != "ray":
        raise MtlbenchError("--ray-address applies to --executor ray")
    if gpus and name != "ray":
        raise MtlbenchError("--gpus-per-run applies to --executor ray (the other executors use --device)")
    if threads is not None and threads < 1:
        raise MtlbenchError(f"--cpus-per-run must be at least 1, got {threads}")
    if name == "processes":
        return ProcessExecutor(max(1, (os.cpu_count() or 1) // (threads or 1)) if workers is None else workers,
                               threads)
    if name == "ray":
        return RayExecutor(ray_address, threads or 1, gpus or 0)
    return LocalExecutor(threads, step_bar)
