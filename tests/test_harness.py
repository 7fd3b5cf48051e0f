"""Sweeps: resume after SIGKILL, failures recorded, budgets, corrupt files, measurement."""
from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from mtlbench import harness, results
from mtlbench.aggregate import ci95
from mtlbench.cli import main
from mtlbench.config import RunConfig
from mtlbench.engine import method_flops
from mtlbench.measure import count_flops

from helpers import TINY_ARGS


def json_files(folder):
    return sorted((folder / "runs").glob("*.json"))


@pytest.mark.slow
def test_sigkill_mid_sweep_then_resume(tmp_path):
    args = ["run", "--methods", "hard,tr,stl", "--tasks", "2,3", "--out", str(tmp_path), *TINY_ARGS]
    args[args.index("--steps-per-task") + 1] = "15"
    proc = subprocess.Popen([sys.executable, "-m", "mtlbench.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(json_files(tmp_path)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in json_files(tmp_path)}
    assert 2 <= len(finished) < 6
    for p in json_files(tmp_path):
        assert json.loads(p.read_text())["status"] == "ok"  # whole files only
    assert main(args) == 0
    after = json_files(tmp_path)
    assert len(after) == 6
    for p in after:  # finished runs were not run again
        if p.name in finished:
            assert (p.stat().st_mtime_ns, p.read_bytes()) == finished[p.name]
    df = pd.read_csv(tmp_path / "results.csv")
    assert len(df) == 6 and df["key"].is_unique


def test_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path, capsys, monkeypatch):
    real = harness.execute

    def flaky(cfg, *a, **kw):
        if cfg.method == "tr":
            raise FloatingPointError("non-finite loss nan at step 3")
        return real(cfg, *a, **kw)

    monkeypatch.setattr(harness, "execute", flaky)
    assert main(["run", "--methods", "tr,hard", "--tasks", "2", "--out", str(tmp_path), *TINY_ARGS]) == 0
    statuses = {json.loads(p.read_text())["config"]["method"]: json.loads(p.read_text()) for p in json_files(tmp_path)}
    assert statuses["tr"]["status"] == "failed" and "non-finite" in statuses["tr"]["reason"]
    assert statuses["hard"]["status"] == "ok"
    assert "failed" in capsys.readouterr().out


def test_settings_over_the_parameter_budget_are_skipped_with_a_reason(tmp_path, capsys):
    assert main(["run", "--methods", "hard,stl", "--tasks", "3", "--max-params", "3000",
                 "--out", str(tmp_path), *TINY_ARGS]) == 0
    runs = {r["config"]["method"]: r for r in results.load_runs(tmp_path)}
    assert runs["stl"]["status"] == "skipped" and "exceed --max-params 3,000" in runs["stl"]["reason"]
    assert runs["hard"]["status"] == "ok"  # 1,467 parameters; stl has 3 backbones, 4,299
    assert "skipped" in capsys.readouterr().out


def test_corrupt_and_foreign_files_are_reported_skipped_and_kept(tmp_path, capsys):
    args = ["run", "--methods", "hard", "--tasks", "2", "--out", str(tmp_path), *TINY_ARGS]
    assert main(args) == 0
    (path,) = json_files(tmp_path)
    path.write_text('{"truncated": ')          # the finished run's file is now corrupt
    (tmp_path / "runs" / "notes.json").write_text('{"mine": 1}')
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"skipping {path.name}" in err and "skipping notes.json" in err
    assert path.read_text() == '{"truncated": '  # never silently overwritten
    assert (tmp_path / "runs" / "notes.json").read_text() == '{"mine": 1}'
    assert len(results.load_runs(tmp_path, warn=lambda m: None)) == 1
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "rep")]) == 0
    assert main(["compare", str(tmp_path), str(tmp_path)]) == 0


def test_flops_of_a_known_network_equal_hand_counts():
    from helpers import with_method
    # convnet with one block of 4 channels on 3x8x8 images: conv3x3 (no bias), pad 1.
    conv = 2 * 8 * 8 * 4 * 3 * 9  # 2 FLOPs per multiply-add, every output pixel and channel
    cfg = with_method(RunConfig(tasks=2, backbone_options={"widths": (4,)}), "hard")
    f = method_flops(cfg, (3, 8, 8))
    assert f["forward_per_image_task"] == conv / 2  # one shared pass serves both tasks
    # backward: the weight gradient costs as much as the forward; the first layer needs no
    # input gradient. Per (image, task) pair with both tasks in every step: 2 * conv / 2.
    assert f["train_per_pair"] == 2 * conv / 2
    tr_cfg = RunConfig(tasks=2, backbone_options={"widths": (4,)})
    dense = method_flops(with_method(tr_cfg, "tr", impl="dense", inference="dense"), (3, 8, 8))
    assert dense["forward_per_image_task"] == conv  # one full masked pass per task
    # All-task inference (default): the first conv is computed once for all tasks; each
    # task's second conv reads every first-layer channel (zero weights on those it drops).
    two = with_method(RunConfig(tasks=2, backbone_options={"widths": (4, 8)}), "tr", sigma=0.0)
    first, second = 2 * 8 * 8 * 4 * 3 * 9, 2 * 4 * 4 * 4 * 4 * 9  # 8x8 -> pool -> 4x4; 4 of 8 kept
    assert method_flops(two, (3, 8, 8))["forward_per_image_task"] == (first + 2 * second) / 2
    # Compact: each task's pass computes only its kept channels. At sigma 0 with 2 tasks and
    # 16 channels each task keeps exactly 8 (a multiple of the padding unit, so no padding).
    sep = with_method(RunConfig(tasks=2, backbone_options={"widths": (16,)}), "tr", sigma=0.0, impl="compact")
    assert method_flops(sep, (3, 8, 8))["forward_per_image_task"] == 2 * 8 * 8 * 8 * 3 * 9
    assert count_flops(lambda: torch.nn.Linear(10, 5)(torch.randn(7, 10))) == 2 * 7 * 10 * 5


def test_parameter_counts_of_a_known_network():
    from mtlbench.engine import build_method
    from helpers import with_method
    cfg = with_method(RunConfig(tasks=3, backbone_options={"widths": (4, 6)}), "hard")
    p = build_method(cfg, 3).param_counts()
    backbone = 3 * 4 * 9 + 2 * 4 + 4 * 6 * 9 + 2 * 6  # conv weights (no bias) + BN scale and shift
    assert p["shared"] == backbone and p["task_specific"] == 3 * (6 + 1)
    cs = build_method(with_method(RunConfig(tasks=3, backbone_options={"widths": (4, 6)}), "cross-stitch"),
                      3).param_counts()
    assert cs["trainable"] == 3 * backbone + 9 * (4 + 6) + 3 * (6 + 1)


def test_confidence_interval_on_a_known_sample():
    # mean 2, sample sd 1, n 3: half-width = t(0.975, 2) * 1 / sqrt(3) = 4.303 / 1.7320508
    assert ci95([1.0, 2.0, 3.0]) == pytest.approx(4.303 / 3 ** 0.5, rel=1e-9)
    assert pd.isna(ci95([5.0]))
    assert ci95([2.0, 2.0, 2.0, 2.0]) == 0.0


@pytest.mark.slow
def test_report_writes_every_figure_and_table(tmp_path, capsys):
    res = tmp_path / "res"
    assert main(["run", "--methods", "tr,hard,separate,stl", "--tasks", "2,3", "--sigma", "0.25,0.75",
                 "--seed", "0,1", "--out", str(res), *TINY_ARGS]) == 0
    out = tmp_path / "report"
    assert main(["report", str(res), "--out", str(out)]) == 0
    from mtlbench.report import FIGURES
    for name in FIGURES:
        assert (out / f"{name}.png").stat().st_size > 1000 and (out / f"{name}.svg").exists()
    readme = (out / "README.md").read_text()
    assert "mtlbench run --methods tr,hard,separate,stl" in readme and "## Results" in readme
    assert "Headline metric: mean balanced accuracy" in readme
    agg = pd.read_csv(out / "aggregate.csv")
    assert set(agg["label"]) == {"tr σ=0.25", "tr σ=0.75", "hard", "separate", "stl"}
    assert (agg["seeds"] == 2).all() and agg["mean_accuracy_ci95"].notna().all()


def test_every_series_of_a_figure_looks_different_and_a_lone_method_keeps_its_colour():
    from mtlbench.report import colour, paints
    weightings = ["aligned", "cagrad", "dwa", "famo", "gradnorm", "imtl", "mgda", "nash", "pcgrad", "rlw", "uw"]
    series = [("stl", "stl"), ("hard", "hard")] + [(f"hard+{w}", "hard") for w in weightings]
    look = paints(series)
    assert len(set(look.values())) == len(series)  # 13 series, 13 (colour, style) pairs
    assert look["stl"] == (colour("stl"), "-") and look["hard"] == (colour("hard"), "-")
    assert all(look[f"hard+{w}"][0] not in {colour("stl"), colour("hard")} for w in weightings)
    assert paints([("tr σ=0.5", "tr"), ("hard", "hard")]) == {"tr σ=0.5": (colour("tr"), "-"),
                                                             "hard": (colour("hard"), "-")}


def test_compare_passes_fails_and_reports_missing(tmp_path, capsys):
    res = tmp_path / "res"
    assert main(["run", "--methods", "hard,stl", "--tasks", "2", "--out", str(res), *TINY_ARGS]) == 0
    base = pd.read_csv(res / "results.csv")
    base.to_csv(tmp_path / "base.csv", index=False)
    assert main(["compare", str(tmp_path / "base.csv"), str(res)]) == 0

    worse = base.copy()
    worse.loc[worse["method"] == "hard", "mean_balanced_accuracy"] -= 0.05  # 5 points
    worse.to_csv(tmp_path / "worse.csv", index=False)
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "base.csv"), str(tmp_path / "worse.csv")]) == 1
    assert "MEAN_BALANCED_ACCURACY -5.00 pts" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "base.csv"), str(tmp_path / "worse.csv"), "--max-acc-drop", "6"]) == 0

    slower = base.copy()
    slower["train_pairs_per_s"] *= 0.5
    slower.to_csv(tmp_path / "slower.csv", index=False)
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "base.csv"), str(tmp_path / "slower.csv")]) == 1
    assert "SLOWER 50.0%" in capsys.readouterr().out

    base[base["method"] == "hard"].to_csv(tmp_path / "partial.csv", index=False)
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "base.csv"), str(tmp_path / "partial.csv")]) == 1
    assert "MISSING in new" in capsys.readouterr().out


def test_compare_matches_a_table_written_before_a_change_of_the_setting_identity(tmp_path, capsys):
    """A committed table keeps the setting hashes of the version that wrote it; compare reads
    the setting from each row's configuration, so the same runs still match today."""
    res = tmp_path / "res"
    assert main(["run", "--methods", "hard,stl", "--tasks", "2", "--out", str(res), *TINY_ARGS]) == 0
    old = pd.read_csv(res / "results.csv")
    old["setting"], old["reference"] = "0123456789ab", "ba9876543210"  # another version's hashes
    old.to_csv(tmp_path / "old.csv", index=False)
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "old.csv"), str(res)]) == 0
    assert "MISSING" not in capsys.readouterr().out


def test_compare_bad_input_is_one_line(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "nope"), str(tmp_path)]) == 2
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    assert main(["compare", str(tmp_path / "x.csv"), str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "not a results table of this mtlbench version" in err


def test_log_spaced_task_shorthand():
    from mtlbench.cli import parse_tasks
    assert parse_tasks("2:500") == [2, 5, 10, 20, 50, 100, 200, 500]
    assert parse_tasks("3:40") == [3, 5, 10, 20, 40]


def test_precisions_are_separate_settings_with_their_own_stl_reference(tmp_path, capsys):
    from mtlbench.aggregate import aggregate
    for precision in ("fp32", "bf16"):
        assert main(["run", "--methods", "hard,stl", "--tasks", "2", "--precision", precision,
                     "--out", str(tmp_path), *TINY_ARGS]) == 0
    runs = results.load_runs(tmp_path)
    agg = aggregate(results.table(runs))
    assert sorted(zip(agg["method"], agg["precision"])) == [("hard", "bf16"), ("hard", "fp32"),
                                                             ("stl", "bf16"), ("stl", "fp32")]
    assert (agg["seeds"] == 1).all()
    by = {(r["config"]["method"], r["config"]["precision"]): r for r in runs}
    for precision in ("fp32", "bf16"):
        hard, stl = by["hard", precision], by["stl", precision]
        expected = results.delta_m(hard["metrics"]["accuracy"], stl["metrics"]["accuracy"])
        assert hard["delta_m"]["accuracy"] == pytest.approx(expected)


def test_delta_m_pairs_each_seed_with_the_reference_of_that_seed():
    """With several seeds, a run is compared with the reference run of its own seed (so the
    reference's own Δm is exactly 0), or with the reference's per-task mean over its seeds."""
    def run(method, seed, accs):
        config = RunConfig(method=method, tasks=2, seed=seed).to_dict()
        return {"config": config, "status": "ok", "metrics": {name: list(accs) for name in results.DELTA_M_METRICS}}

    stl = [run("stl", 0, [0.8, 0.6]), run("stl", 1, [0.9, 0.7])]
    hard = [run("hard", 0, [0.8, 0.66]), run("hard", 1, [0.9, 0.7]), run("hard", 2, [0.85, 0.65])]
    runs = stl + hard
    results.add_delta_m(runs)
    assert [r["delta_m"]["accuracy"] for r in stl] == [0.0, 0.0]
    assert hard[0]["delta_m"]["accuracy"] == pytest.approx(5.0)   # (0 + 10%) / 2 against seed 0
    assert hard[1]["delta_m"]["accuracy"] == pytest.approx(0.0)   # against seed 1
    assert hard[2]["delta_m"]["accuracy"] == pytest.approx(0.0)   # no stl seed 2: the mean [0.85, 0.65]


def test_delta_m_needs_the_reference_on_the_same_tasks(tmp_path, capsys):
    """The issue's case: hard on task0007,task0009 must not be compared with stl on task0000,task0001."""
    assert main(["run", "--methods", "stl", "--task-names", "task0000,task0001", "--out", str(tmp_path),
                 *TINY_ARGS]) == 0
    assert main(["run", "--methods", "hard", "--task-names", "task0007,task0009", "--out", str(tmp_path),
                 *TINY_ARGS]) == 0
    out = capsys.readouterr().out
    hard_line = [line for line in out.splitlines() if line.startswith("hard")][-1]
    assert "n/a" in hard_line
    runs = results.load_runs(tmp_path)
    results.add_delta_m(runs)
    assert all(r["delta_m"]["balanced_accuracy"] is None for r in runs if r["config"]["method"] == "hard")
    assert main(["run", "--methods", "stl", "--task-names", "task0007,task0009", "--out", str(tmp_path),
                 *TINY_ARGS]) == 0
    runs = results.load_runs(tmp_path)
    table = results.table(runs)
    assert table.loc[table["method"] == "hard", "delta_m_balanced_accuracy"].notna().all()


def test_aggregation_and_compare_keep_settings_with_different_options_apart(tmp_path, capsys):
    from mtlbench.aggregate import aggregate
    from mtlbench.compare import compare
    assert main(["run", "--methods", "tr", "--tasks", "2", "--seed", "0,1", "--out", str(tmp_path),
                 *TINY_ARGS]) == 0
    assert main(["run", "--methods", "tr", "--tasks", "2", "--seed", "0,1", "-o", "method.bn_stats=kept",
                 "--out", str(tmp_path), *TINY_ARGS]) == 0
    assert main(["run", "--methods", "hard", "--tasks", "2", "--seed", "0,1", "-o", "dataset.relatedness=0.9",
                 "--out", str(tmp_path), *TINY_ARGS]) == 0
    assert main(["run", "--methods", "hard", "--tasks", "2", "--seed", "0,1", "--out", str(tmp_path),
                 *TINY_ARGS]) == 0
    table = results.table(results.load_runs(tmp_path))
    agg = aggregate(table)
    assert len(agg) == 4 and (agg["seeds"] == 2).all()  # four settings, two seeds each
    assert set(agg["label"]) == {"tr σ=0.5", "tr σ=0.5 bn_stats=kept", "hard"}
    # Implementation choices tested to give the same numbers are one setting.
    assert main(["run", "--methods", "tr", "--tasks", "2", "--seed", "0,1", "--tr-impl", "dense",
                 "--out", str(tmp_path), *TINY_ARGS]) == 0
    table = results.table(results.load_runs(tmp_path))
    agg = aggregate(table)
    assert len(agg) == 4 and (agg["seeds"] == 2).all() and sorted(agg["runs"]) == [2, 2, 2, 4]
    # compare: a folder missing one of the settings reports exactly that one
    partial = table[table["label"] != "tr σ=0.5 bn_stats=kept"]
    out, problems = compare(table, partial, 100, 100)
    assert problems == 1 and (out["verdict"] == "MISSING in new").sum() == 1


def test_compare_fails_on_a_value_that_is_not_a_number(tmp_path, capsys):
    assert main(["run", "--methods", "hard", "--tasks", "2", "--out", str(tmp_path / "res"), *TINY_ARGS]) == 0
    base = pd.read_csv(tmp_path / "res" / "results.csv")
    broken = base.copy()
    broken["mean_balanced_accuracy"] = float("nan")
    broken["train_pairs_per_s"] = float("nan")
    broken.to_csv(tmp_path / "nan.csv", index=False)
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "res" / "results.csv"), str(tmp_path / "nan.csv")]) == 1
    out = capsys.readouterr().out
    assert "NOT A NUMBER" in out and "THROUGHPUT NOT A NUMBER" in out


def test_select_val_picks_the_best_validation_value(tmp_path, capsys):
    """A crafted results folder: two learning rates per method, validation and test scores
    set by hand so that the best test and the best validation disagree."""
    from mtlbench.aggregate import select_val
    assert main(["run", "--methods", "hard,stl", "--tasks", "2", "--lr", "0.001,0.01", "--seed", "0,1",
                 "--out", str(tmp_path), *TINY_ARGS]) == 0
    for path in (tmp_path / "runs").glob("*.json"):
        run = json.loads(path.read_text())
        low = run["config"]["lr"] == 0.001
        run["train"]["selection"]["best_value"] = 0.9 if low else 0.6   # validation prefers lr 0.001
        run["metrics"]["mean_balanced_accuracy"] = 0.5 if low else 0.99  # test would prefer 0.01
        run["metrics"]["balanced_accuracy"] = [run["metrics"]["mean_balanced_accuracy"]] * 2
        path.write_text(json.dumps(run))
    table = results.table(results.load_runs(tmp_path))
    chosen = select_val(table, ["lr"])
    assert set(chosen["lr"]) == {0.001} and len(chosen) == 4  # 2 methods x 2 seeds
    assert set(chosen["tuned_over"]) == {2}
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "rep"), "--select", "val"]) == 0
    readme = (tmp_path / "rep" / "README.md").read_text()
    assert "## Tuning" in readme and "values tried" in readme
    agg = pd.read_csv(tmp_path / "rep" / "aggregate.csv")
    assert (agg["mean_balanced_accuracy_mean"] == 0.5).all()  # the test score of the choice
    assert (agg["delta_m_balanced_accuracy_mean"] == 0.0).all()  # against stl's own choice
    out, problems = __import__("mtlbench.compare", fromlist=["compare"]).compare(table, table, 1, 10, tune=["lr"])
    assert problems == 0 and len(out) == 2


def test_time_budget_skips_with_the_measured_step_and_a_larger_budget_runs_it(tmp_path, capsys):
    args = ["run", "--methods", "hard", "--tasks", "2", "--out", str(tmp_path), *TINY_ARGS]
    args[args.index("--steps-per-task") + 1] = "50"
    assert main([*args, "--max-train-seconds", "0.0001"]) == 0
    (run,) = results.load_runs(tmp_path)
    assert run["status"] == "skipped" and "exceeds --max-train-seconds" in run["reason"]
    assert run["probe"]["probe_step_seconds"] > 0 and run["probe"]["steps_planned"] == 50
    assert run["memory"]["peak_bytes"] > 0 and run["flops"]["train_per_pair"] > 0
    table = results.table([run])
    assert table["train_pairs_per_s"].iloc[0] > 0  # from the probe steps
    assert main([*args, "--max-train-seconds", "0.0001"]) == 0  # the same budget: still skipped, not retried
    assert "1 of 1 runs already finished" in capsys.readouterr().err
    assert main(args) == 0  # no budget: it runs
    (run,) = results.load_runs(tmp_path)
    assert run["status"] == "ok"


def test_report_of_a_folder_whose_runs_were_all_skipped_on_time(tmp_path):
    """Only probe figures exist (the weighting cost sweeps): the report draws step time and
    memory against T and says there are no measurements where there are none, no traceback."""
    args = ["run", "--methods", "hard", "--weighting", "ew,mgda", "--tasks", "2,3", "--out", str(tmp_path), *TINY_ARGS]
    args[args.index("--steps-per-task") + 1] = "50"
    assert main([*args, "--max-train-seconds", "0.0001"]) == 0
    assert {r["status"] for r in results.load_runs(tmp_path)} == {"skipped"}
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "rep")]) == 0
    readme = (tmp_path / "rep" / "README.md").read_text()
    assert (tmp_path / "rep" / "step_time_vs_tasks.png").exists() and "step time ∝ T^" in readme


COUNTING_RUNNER = """
import sys
from mtlbench import harness
from mtlbench.cli import main
log, real = sys.argv[1], harness.execute

def counted(cfg, *args, **kwargs):
    with open(log, "a") as f:
        f.write(cfg.key() + "\\n")
    return real(cfg, *args, **kwargs)

harness.execute = counted
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_two_concurrent_sweeps_into_one_folder_never_train_a_run_twice(tmp_path):
    runner = tmp_path / "runner.py"
    runner.write_text(COUNTING_RUNNER)
    args = ["run", "--methods", "hard,tr,stl", "--tasks", "2,3", "--seed", "0,1", "--out", str(tmp_path / "out"),
            *TINY_ARGS]
    procs = [subprocess.Popen([sys.executable, str(runner), str(tmp_path / "trained.log"), *args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    trained = (tmp_path / "trained.log").read_text().split()
    assert len(trained) == len(set(trained)) == 12  # every run trained exactly once
    assert main(args) == 0  # a third sweep collects everything and trains nothing
    assert len((tmp_path / "trained.log").read_text().split()) == 12
    df = pd.read_csv(tmp_path / "out" / "results.csv")
    assert len(df) == 12 and len(pd.read_parquet(tmp_path / "out" / "results.parquet")) == 12


def test_a_dead_claim_is_taken_over_and_a_live_one_respected(tmp_path):
    sweep = harness.Sweep(tmp_path, 10 ** 9, warn=lambda m: None)
    claims = tmp_path / "runs" / ".claims"
    claims.mkdir()
    (claims / "deadbeef0000.claim").write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": __import__("socket").gethostname()}))
    with sweep.claim("deadbeef0000") as mine:
        assert mine  # its process is gone
    (claims / "cafe00000000.claim").write_text(json.dumps({"pid": 1, "host": __import__("socket").gethostname()}))
    with sweep.claim("cafe00000000") as mine:
        assert not mine  # PID 1 is alive
    assert (claims / "cafe00000000.claim").exists()


def test_concurrent_table_writers_queue_and_leave_complete_consistent_tables(tmp_path):
    import threading
    assert main(["run", "--methods", "hard,stl", "--tasks", "2", "--seed", "0,1,2", "--out", str(tmp_path),
                 *TINY_ARGS]) == 0
    (tmp_path / ".tmp-results-orphan.part").write_text("left by a killed writer")
    errors = []

    def write():
        try:
            results.refresh_tables(tmp_path, warn=lambda m: None)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(pd.read_csv(tmp_path / "results.csv")) == 6 == len(pd.read_parquet(tmp_path / "results.parquet"))
    assert not list(tmp_path.glob(".tmp-results*"))  # no orphans left


def test_a_diverged_run_is_recorded_as_failed_with_its_reason(tmp_path, capsys):
    assert main(["run", "--methods", "hard", "--tasks", "2", "--lr", "1e9", "--out", str(tmp_path), *TINY_ARGS,
                 "--steps-per-task", "20"]) == 0
    (run,) = results.load_runs(tmp_path)
    assert run["status"] == "failed" and "diverged" in run["reason"]


def test_impossible_backbone_widths_are_one_line_before_any_run(tmp_path, capsys):
    code = main(["run", "--methods", "hard", "--tasks", "2", "--out", str(tmp_path), *TINY_ARGS,
                 "-o", "backbone.widths=0"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "widths must be positive" in err  # bad input: one line


def test_an_output_folder_whose_root_is_not_writable_fails_before_training(tmp_path, capsys):
    import os
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    out.chmod(0o555)
    try:
        assert main(["run", "--methods", "hard", "--tasks", "2", "--out", str(out), *TINY_ARGS]) == 2
        assert "cannot write results" in capsys.readouterr().err
    finally:
        out.chmod(0o755)


def test_a_budget_given_as_a_whole_float_is_the_same_setting_as_the_default_int():
    # `--epochs 4` is parsed as 4.0, while the dataset default resolves to 4: one setting, so
    # Δm finds its reference and aggregation puts the runs together.
    from helpers import tiny_config
    from mtlbench.config import reference_key, setting_key
    base = tiny_config(epochs=4, steps_per_task=None).to_dict()
    given = dict(base, epochs=4.0)
    other_method = dict(given, method="stl", method_options={})
    assert setting_key(given) == setting_key(base)
    assert reference_key(other_method) == reference_key(base)
    assert setting_key(dict(base, epochs=4.5)) != setting_key(base)
    assert setting_key(dict(base, lr=0.003)) != setting_key(dict(base, lr=0.004))


def test_report_prints_one_budget_for_4_and_4_point_0_epochs(tmp_path):
    """``--epochs 4`` records 4.0 and a dataset's default records 4: the same budget, one line."""
    tiny = list(TINY_ARGS)
    i = tiny.index("--steps-per-task")
    tiny[i:i + 2] = ["--epochs", "1"]
    assert main(["run", "--methods", "hard", "--tasks", "2", "--seed", "0,1", "--out", str(tmp_path), *tiny]) == 0
    files = json_files(tmp_path)
    assert len(files) == 2
    recorded = json.loads(files[0].read_text())
    assert recorded["train"]["budget"]["epochs"] == 1.0
    recorded["train"]["budget"]["epochs"] = 1
    files[0].write_text(json.dumps(recorded))
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "rep")]) == 0
    line = next(t for t in (tmp_path / "rep" / "README.md").read_text().splitlines() if "budget per task" in t)
    assert line == '- budget per task: {"epochs": 1, "batches_per_task": %d, "given_as": "epochs"}' % (
        recorded["train"]["budget"]["batches_per_task"])
