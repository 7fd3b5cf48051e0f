"""Executors (local, processes, Ray), retries, traceback files, Ctrl-C and the tables' consistency."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from mtlbench import harness, results
from mtlbench.cli import main
from mtlbench.executors import ProcessExecutor

from helpers import TINY_ARGS

SWEEP = ["--methods", "hard,tr", "--tasks", "2", "--seed", "0,1", *TINY_ARGS]


def runs(folder):
    return {r["key"]: r for r in results.load_runs(folder, warn=lambda m: None)}


def same_numbers(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) == 4
    for key in a:
        assert a[key]["status"] == b[key]["status"] == "ok"
        assert a[key]["metrics"] == b[key]["metrics"]  # every per-task figure, exactly
        assert a[key]["metrics_final"] == b[key]["metrics_final"]
        assert a[key]["train"]["curve"] == b[key]["train"]["curve"] and a[key]["train"]["final_loss"] == b[key]["train"]["final_loss"]


@pytest.mark.slow
def test_processes_and_ray_give_the_same_results_as_local(tmp_path):
    """One thread per run everywhere, so that the kernels sum in the same order."""
    import torch
    threads = torch.get_num_threads()
    assert main(["run", *SWEEP, "--cpus-per-run", "1", "--out", str(tmp_path / "local")]) == 0
    assert torch.get_num_threads() == threads  # the caller's thread count is restored
    assert main(["run", *SWEEP, "--executor", "processes", "--workers", "2",
                 "--out", str(tmp_path / "processes")]) == 0
    local, pooled = runs(tmp_path / "local"), runs(tmp_path / "processes")
    same_numbers(local, pooled)
    assert {r["executor"]["name"] for r in pooled.values()} == {"processes"}
    assert {(r["executor"]["workers"], r["executor"]["threads_per_run"], r["runtime"]["threads"])
            for r in pooled.values()} == {(2, 1, 1)}  # 2 cores shared by 2 workers: 1 thread each
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="error")  # a local Ray with 2 CPUs
    try:
        assert main(["run", *SWEEP, "--executor", "ray", "--ray-address", "auto", "--cpus-per-run", "1",
                     "--out", str(tmp_path / "ray")]) == 0
        assert ray.is_initialized()  # a cluster it joined is left running
    finally:
        ray.shutdown()
    distributed = runs(tmp_path / "ray")
    same_numbers(local, distributed)
    assert {r["executor"]["cpus_per_run"] for r in distributed.values()} == {1}
    assert all(isinstance(r["ray_node"], str) and r["ray_node"] for r in distributed.values())
    df = pd.read_csv(tmp_path / "ray" / "results.csv")
    assert len(df) == 4 == len(pd.read_parquet(tmp_path / "ray" / "results.parquet"))


@pytest.mark.slow
def test_ray_starts_and_stops_its_own_local_instance(tmp_path):
    ray = pytest.importorskip("ray")
    assert main(["run", "--methods", "hard", "--tasks", "2", *TINY_ARGS, "--executor", "ray",
                 "--out", str(tmp_path)]) == 0
    assert not ray.is_initialized()
    (run,) = runs(tmp_path).values()
    assert run["status"] == "ok" and run["executor"]["address"] == "local instance"


def test_ray_options_and_a_missing_ray_are_one_line(tmp_path, capsys, monkeypatch):
    args = ["run", "--methods", "hard", "--tasks", "2", *TINY_ARGS, "--out", str(tmp_path)]
    cases = [(["--executor", "ray", "--ray-address", "127.0.0.1:1"], "no Ray cluster answers at 127.0.0.1:1"),
             (["--executor", "ray", "--ray-address", "nowhere"], "--ray-address takes auto or HOST:PORT"),
             (["--ray-address", "auto"], "--ray-address applies to --executor ray"),
             (["--workers", "2"], "--workers applies to --executor processes"),
             (["--gpus-per-run", "1"], "--gpus-per-run applies to --executor ray"),
             (["--executor", "processes", "--workers", "0"], "--workers must be at least 1"),
             (["--cpus-per-run", "0"], "--cpus-per-run must be at least 1"),
             (["--retries", "-1"], "--retries must be 0 or more")]
    try:
        import ray  # noqa: F401
    except ImportError:  # without the extra, --executor ray meets the missing-Ray line first
        cases = [(e, 'pip install -e ".[ray]"' if "ray" in e else m) for e, m in cases]
    for extra, message in cases:
        capsys.readouterr()
        assert main([*args, *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed
    assert main([*args, "--executor", "ray"]) == 2
    assert 'pip install -e ".[ray]"' in capsys.readouterr().err
    assert not list((tmp_path / "runs").glob("*.json"))


def test_failed_runs_are_retried_and_keep_a_traceback_file(tmp_path, capsys, monkeypatch):
    real, calls = harness.execute, []

    def flaky(cfg, *a, **kw):  # tr fails on its first attempt, hard on every attempt
        calls.append(cfg.method)
        if cfg.method == "hard" or calls.count("tr") == 1:
            raise RuntimeError(f"{cfg.method} broke")
        return real(cfg, *a, **kw)

    monkeypatch.setattr(harness, "execute", flaky)
    args = ["run", "--methods", "hard,tr", "--tasks", "2", *TINY_ARGS, "--out", str(tmp_path)]
    assert main([*args, "--retries", "2"]) == 0
    by_method = {r["config"]["method"]: r for r in runs(tmp_path).values()}
    assert by_method["tr"]["status"] == "ok" and by_method["tr"]["attempts"] == 2
    hard = by_method["hard"]
    assert hard["status"] == "failed" and hard["attempts"] == 3 and "hard broke" in hard["reason"]
    tb = tmp_path / "runs" / hard["traceback_file"]
    assert "Traceback" in tb.read_text() and "RuntimeError: hard broke" in tb.read_text()
    assert "retrying (1 of 2)" in capsys.readouterr().err
    calls.clear()
    assert main([*args, "--skip-failed"]) == 0  # the failed run is kept as it is
    assert calls == []
    assert main(args) == 0  # by default a rerun retries it (once: --retries 0)
    assert calls == ["hard"]


def test_a_worker_that_dies_fails_its_run_and_the_pool_recovers():
    pool = ProcessExecutor(workers=1, threads=1)
    try:
        handle = pool.submit(Crasher(), None)
        ((_, (kind, value)),) = pool.wait([handle])
        assert kind == "ok" and value["status"] == "failed" and "worker process died" in value["reason"]
        handle = pool.submit(Crasher(exit=False), None)  # a new pool takes the next run
        assert pool.wait([handle])[0][1] == ("ok", {"status": "ok"})
    finally:
        pool.close()


ORPHAN_DRIVER = """
import sys
sys.path.insert(0, sys.argv[1])
from helpers import Sleeper
from mtlbench.executors import ProcessExecutor
pool = ProcessExecutor(workers=1, threads=1)
pool.wait([pool.submit(Sleeper(), sys.argv[2])])
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read()
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_pool_worker_exits_when_its_driver_is_killed(tmp_path, sig):
    pid_file = tmp_path / "worker.pid"
    driver = subprocess.Popen([sys.executable, "-c", ORPHAN_DRIVER, os.path.dirname(__file__), str(pid_file)])
    try:
        deadline = time.time() + 120
        while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
            time.sleep(0.05)
        worker = int(pid_file.read_text())
        assert _alive(worker)
        driver.send_signal(sig)
        driver.wait(timeout=30)
        deadline = time.time() + 30
        while _alive(worker) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(worker), "the worker outlived its driver"
    finally:
        driver.kill()
        if pid_file.exists() and pid_file.read_text() and _alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


class Crasher:
    def __init__(self, exit: bool = True) -> None:
        self.exit = exit

    def __call__(self, cfg, progress=None):
        if self.exit:
            os._exit(9)  # as a process killed for memory
        return {"status": "ok"}


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["local", "processes", "ray"])
def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path, executor):
    if executor == "ray":
        pytest.importorskip("ray")
    args = ["run", "--methods", "hard,tr,stl", "--tasks", "2,3", "--out", str(tmp_path), *TINY_ARGS,
            "--executor", executor]
    args[args.index("--steps-per-task") + 1] = "40"
    # A shell ignores SIGINT in what it starts in the background (POSIX), and a child inherits
    # that: give the command Ctrl-C's default, so that the test holds however pytest was started.
    proc = subprocess.Popen([sys.executable, "-m", "mtlbench.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not list((tmp_path / "runs").glob("*.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "Rerun the same command to resume: mtlbench run --methods hard,tr,stl" in err
    files = list((tmp_path / "runs").glob("*.json"))
    assert 1 <= len(files) < 6
    assert all(json.loads(p.read_text())["status"] == "ok" for p in files)  # whole files only
    assert not list((tmp_path / "runs" / ".claims").glob("*"))  # claims released
    assert not list(tmp_path.rglob(".tmp*"))
    assert len(pd.read_csv(tmp_path / "results.csv")) == len(files)  # the tables hold what finished
    assert main(args) == 0
    assert len(pd.read_csv(tmp_path / "results.csv")) == 6


KILL_BETWEEN_RENAMES = """
import os, signal, sys
from mtlbench import results
real, seen = os.replace, []

def replace(src, dst):
    real(src, dst)
    seen.append(str(dst))
    if sum(d.endswith("results.parquet") for d in seen) == 2:  # the refresh after the run, between its renames
        os.kill(os.getpid(), signal.SIGKILL)

results.os.replace = replace
from mtlbench.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_kill_between_the_two_table_renames_is_mended_by_the_next_command(tmp_path):
    script = tmp_path / "killer.py"
    script.write_text(KILL_BETWEEN_RENAMES)
    out = tmp_path / "out"
    assert main(["run", "--methods", "hard", "--tasks", "2", *TINY_ARGS, "--out", str(out)]) == 0
    args = ["run", "--methods", "hard", "--tasks", "3", *TINY_ARGS, "--out", str(out)]
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(pd.read_parquet(out / "results.parquet")) == 2 != len(pd.read_csv(out / "results.csv"))  # the window
    assert main(["compare", str(out), str(out)]) == 0  # a reader sees every run from the run files
    assert main(args) == 0  # the next run mends the tables first (and trains nothing)
    csv, parquet = pd.read_csv(out / "results.csv"), pd.read_parquet(out / "results.parquet")
    assert len(csv) == len(parquet) == 2 and list(csv["key"]) == list(parquet["key"])
