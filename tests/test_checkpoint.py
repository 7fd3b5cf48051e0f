"""A run killed inside its training resumes from its last checkpoint to the same numbers."""
from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time

import pytest

from mtlbench import checkpoint as ckpt
from mtlbench.cli import main
from mtlbench.engine import execute, load_data

from helpers import TINY_ARGS, tiny_config, with_method


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, and no handler of Exception catches it."""


def kill_after_save(monkeypatch, nth: int) -> None:
    real = ckpt.RunCheckpoint.save
    count = {"saves": 0}

    def save(self, state):
        real(self, state)
        count["saves"] += 1
        if count["saves"] == nth:
            raise Killed

    monkeypatch.setattr(ckpt.RunCheckpoint, "save", save)


def comparable(result: dict) -> dict:
    """The parts of a result that depend on the numbers (not on timings)."""
    train = result["train"]
    return {"metrics": result["metrics"], "metrics_final": result["metrics_final"],
            "curve": train["curve"], "selection": train["selection"],
            "losses": (train["first_loss"], train["final_loss"]), "seen": train["batches_per_task"],
            "steps": (train["steps"], train["supervised_pairs"]), "weighting": train.get("weighting")}


SETTINGS = [("hard", {}), ("tr", {}), ("tr", {"impl": "dense"}), ("stl", {}), ("separate", {}),
            ("cross-stitch", {}), ("hard", {"weighting": "dwa"}), ("hard", {"weighting": "rlw"}),
            ("hard", {"weighting": "uw"}), ("hard", {"weighting": "pcgrad"}), ("hard", {"weighting": "famo"})]


@pytest.mark.parametrize("method,options", SETTINGS, ids=[f"{m}-{'-'.join(map(str, o.values())) or 'default'}"
                                                          for m, o in SETTINGS])
def test_a_run_killed_after_a_checkpoint_resumes_bit_for_bit(method, options, tmp_path, monkeypatch):
    cfg = with_method(dataclasses.replace(tiny_config(), steps_per_task=6, eval_every="2", lr=3e-3), method,
                      **options)
    data = load_data(cfg)
    whole = execute(cfg, data)
    path = tmp_path / f"{cfg.key()}.pt"
    kill_after_save(monkeypatch, nth=2)
    with pytest.raises(Killed):
        execute(cfg, data, checkpoint=ckpt.RunCheckpoint(path, every=0))
    assert path.exists()
    monkeypatch.undo()
    resumed = execute(cfg, data, checkpoint=ckpt.RunCheckpoint(path, every=0))
    record = resumed["train"]["checkpoints"]
    assert [r["step"] for r in record["resumed"]] == [4]  # the second save, after step 4
    assert record["saved"] == whole["train"]["steps"] // 2 - 1  # every evaluation but the last, over both attempts
    assert comparable(resumed) == comparable(whole)
    assert resumed["train"]["curve"][-1]["val"] == whole["train"]["curve"][-1]["val"]


def test_checkpoints_do_not_change_the_numbers(tmp_path):
    cfg = with_method(dataclasses.replace(tiny_config(), steps_per_task=4, eval_every="1"), "tr")
    data = load_data(cfg)
    saving = ckpt.RunCheckpoint(tmp_path / "run.pt", every=0)
    with_saves = execute(cfg, data, checkpoint=saving)
    assert saving.saves == with_saves["train"]["steps"] - 1  # every evaluation but the last
    assert comparable(with_saves) == comparable(execute(cfg, data))


def test_an_unreadable_or_foreign_checkpoint_is_set_aside_and_the_run_starts_over(tmp_path, caplog):
    cfg = with_method(dataclasses.replace(tiny_config(), steps_per_task=4, eval_every="2"), "hard")
    data = load_data(cfg)
    whole = execute(cfg, data)
    path = tmp_path / f"{cfg.key()}.pt"
    path.write_bytes(b"not a checkpoint")
    result = execute(cfg, data, checkpoint=ckpt.RunCheckpoint(path, every=1e9))
    assert result["train"]["checkpoints"]["resumed"] == []
    assert comparable(result) == comparable(whole)
    assert (tmp_path / f"{cfg.key()}.pt.set-aside").exists() and "set aside" in caplog.text
    other = with_method(dataclasses.replace(cfg, steps_per_task=6), "hard")  # another step plan, same file name
    saving = ckpt.RunCheckpoint(path, every=0)
    execute(other, load_data(other), checkpoint=saving)
    assert path.exists()  # its last save (the file is removed by the sweep once the result is written)
    caplog.clear()
    result = execute(cfg, data, checkpoint=ckpt.RunCheckpoint(path, every=1e9))
    assert "steps_planned" in caplog.text and comparable(result) == comparable(whole)


def test_rng_state_round_trips(tmp_path):
    import random

    import numpy as np
    import torch
    state = ckpt.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


@pytest.mark.slow
def test_sigkill_inside_a_run_then_rerun_resumes_it_to_the_same_result(tmp_path, capsys):
    args = ["run", "--methods", "tr", "--tasks", "3", *TINY_ARGS, "--eval-every", "5", "--checkpoint-every", "0"]
    args[args.index("--steps-per-task") + 1] = "100"
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen([sys.executable, "-m", "mtlbench.cli", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = killed / "runs" / ".partial"
    deadline = time.time() + 120
    while not list(partial.glob("*.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(partial.glob("*.pt")) and not list((killed / "runs").glob("*.json")), "killed inside the run"
    assert main([*args, "--out", str(killed)]) == 0
    assert "resuming from its checkpoint" in capsys.readouterr().err
    assert main([*args, "--out", str(clean), "--no-checkpoints"]) == 0
    (a,), (b,) = [[json.loads(p.read_text()) for p in (d / "runs").glob("*.json")] for d in (killed, clean)]
    assert a["key"] == b["key"]
    assert a["train"]["checkpoints"]["resumed"] and b["train"]["checkpoints"] is None
    assert comparable(a) == comparable(b)
    assert not list(partial.glob("*.pt"))  # removed once the result was written
    assert main(["report", str(killed), "--out", str(tmp_path / "report")]) == 0
    assert "1 resumed from a checkpoint" in (tmp_path / "report" / "README.md").read_text()
