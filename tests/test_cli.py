"""``mtlbench run`` end to end with tiny settings, and every bad input as one clear line."""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from mtlbench.cli import main
from mtlbench.results import COLUMNS

from helpers import TINY_ARGS


def run(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_run_end_to_end(tmp_path, capsys):
    out_dir = tmp_path / "res"
    code, out, err = run(["run", "--methods", "tr,hard,stl", "--tasks", "3", "--out", str(out_dir), *TINY_ARGS], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["method", "tasks", "seed"]
    assert {l.split()[0] for l in lines[1:4]} == {"tr", "hard", "stl"}
    stl_row = next(l for l in lines if l.startswith("stl"))
    assert "+0.00" in stl_row  # stl against itself
    files = sorted((out_dir / "runs").glob("*.json"))
    assert len(files) == 3
    result = json.loads(files[0].read_text())
    for key in ("config", "metrics", "metrics_final", "params", "train", "eval", "environment", "key", "setting"):
        assert key in result
    assert result["config"]["dataset_options"]["num_train"] == 128
    assert result["train"]["optimizer_impl"] == "fused"  # torch 2.14 has fused Adam on CPU
    assert result["environment"]["threads"] >= 1 and "torch" in result["environment"]["versions"]
    df = pd.read_csv(out_dir / "results.csv")
    assert list(df.columns) == COLUMNS and len(df) == 3
    assert df["delta_m_accuracy"].notna().all()


def test_delta_m_is_na_without_stl(tmp_path, capsys):
    code, out, _ = run(["run", "--methods", "hard", "--tasks", "2", "--out", str(tmp_path), *TINY_ARGS], capsys)
    assert code == 0 and "n/a" in out.splitlines()[1]


def test_rerun_skips_finished_runs(tmp_path, capsys):
    args = ["run", "--methods", "hard,tr", "--tasks", "2", "--out", str(tmp_path), *TINY_ARGS]
    assert run(args, capsys)[0] == 0
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*.json")}
    code, _, err = run(args, capsys)
    assert code == 0 and "2 of 2 runs already finished" in err
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*.json")}


BAD = [
    (["--methods", "nope"], "unknown method 'nope'"),
    (["--methods", "hardd"], "did you mean 'hard'"),
    (["--dataset", "cifar"], "unknown dataset"),
    (["--backbone", "resnet9000"], "unknown backbone"),
    (["--tasks", "0"], "positive"),
    (["--tasks", "-3"], "positive"),
    (["--tasks", "5000"], "at most 4096 tasks"),
    (["--tasks", "ten"], "--tasks"),
    (["--sigma", "1.5"], "[0, 1]"),
    (["--sigma", "-0.1"], "[0, 1]"),
    (["--sigma", "half"], "--sigma"),
    (["--seed", "x"], "--seed"),
    (["--lr", "fast"], "--lr takes a number"),
    (["--steps-per-task", "0"], "at least 1"),
    (["--epochs", "0"], "--epochs must be a positive number"),
    (["--epochs", "2"], "not both"),
    (["--val-fraction", "1.5"], "--val-fraction"),
    (["--eval-every", "often"], "--eval-every takes"),
    (["--patience", "-1"], "--patience"),
    (["--warmup", "1"], "--warmup"),
    (["--checkpoint-every", "-1"], "--checkpoint-every must be 0 or more"),
    (["--checkpoint-every", "nan"], "--checkpoint-every must be 0 or more"),
    (["--lr", "0"], "--lr must be positive"),
    (["--seed", "99999999999999999999"], "--seed must be in"),
    (["--schedule", "sometimes"], "applies to none"),
    (["--weighting", "magic"], "unknown weighting 'magic'"),
    (["--methods", "tr", "--weighting", "mgda"], "add --schedule all"),
    (["--methods", "hard", "--weighting", "cagrad", "-o", "weighting.c=-1"], "c >= 0"),
    (["--methods", "hard", "--weighting", "cagrad", "-o", "weighting.bogus=1"], "unknown weighting option(s) bogus"),
    (["--methods", "tr", "-o", "method.masks=paper", "--sigma", "0"], "sigma=0 keeps none"),
    (["--methods", "tr", "-o", "method.bn_stats=maybe"], "bn_stats must be one of"),
    (["--methods", "tr", "--tr-impl", "compact", "-o", "method.bn_stats=all"], "cannot keep bn_stats=all"),
    (["--methods", "tr", "--tr-impl", "compact", "-o", "method.impl=dense"], "disagrees"),
    (["-o", "dataset.colour=red"], "unknown option(s) colour"),
    (["-o", "dataset.relatedness=lots"], "cannot read"),
    (["--device", "tpu"], "device"),
    (["-o", "method.bogus=1"], "unknown method option(s) bogus"),
    (["-o", "method.inference=sideways"], "inference must be one of"),
    (["--sigma", "0.3", "-o", "method.sigma=0.3"], "give sigma once"),
    (["-o", "planet.x=1"], "must look like"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, message):
    code, out, err = run(["run", "--tasks", "2", *TINY_ARGS, "--out", str(tmp_path), *extra], capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("mtlbench: error:"), err
    assert message in err
    assert "Traceback" not in err


def test_method_options_reach_only_the_methods_that_have_them(tmp_path, capsys):
    code, _, err = run(["run", "--methods", "tr,hard", "--tasks", "2", *TINY_ARGS, "--out", str(tmp_path),
                        "-o", "method.inference=loop"], capsys)
    assert code == 0, err
    runs = {r["config"]["method"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json"))}
    assert runs["tr"]["config"]["method_options"]["inference"] == "loop"
    assert runs["tr"]["method_details"]["all_task_inference"] == "loop"
    assert "inference" not in runs["hard"]["config"]["method_options"]
    assert "sigma" not in runs["hard"]["config"]["method_options"]  # methods without sigma record none


def test_unwritable_output_path(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = run(["run", "--tasks", "2", *TINY_ARGS, "--out", str(blocker / "sub")], capsys)
    assert code == 2 and "cannot write results" in err and err.count("\n") == 1
    assert blocker.read_text() == "not a folder"


def test_bad_input_does_not_damage_earlier_results(tmp_path, capsys):
    assert run(["run", "--methods", "hard", "--tasks", "2", "--out", str(tmp_path), *TINY_ARGS], capsys)[0] == 0
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert run(["run", "--methods", "hard", "--tasks", "0", "--out", str(tmp_path)], capsys)[0] == 2
    assert run(["run", "--methods", "nope", "--tasks", "2", "--out", str(tmp_path)], capsys)[0] == 2
    assert before == {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mtlbench.cli", "run", "--sigma", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_list_shows_every_registry(capsys):
    code, out, _ = run(["list"], capsys)
    assert code == 0
    for name in ("tr", "hard", "separate", "cross-stitch", "stl", "synthetic", "convnet", "vgg11",
                 "weightings:", "pcgrad", "Yu et al., NeurIPS 2020", "nash", "famo"):
        assert name in out


def test_nondeterministic_is_its_own_setting(tmp_path, capsys):
    from mtlbench.config import RunConfig
    assert RunConfig(deterministic=False).key() != RunConfig().key()
    assert main(["run", "--methods", "hard", "--tasks", "2", "--nondeterministic", "--out", str(tmp_path),
                 *TINY_ARGS]) == 0
    (path,) = (tmp_path / "runs").glob("*.json")
    run = json.loads(path.read_text())
    assert run["config"]["deterministic"] is False
    assert run["runtime"]["deterministic"] == "cpu kernels (deterministic)"  # nothing to switch on a CPU


def test_shorthands_and_method_options_give_the_same_run_key(tmp_path, capsys):
    keys = []
    for flags in (["--tr-impl", "compact", "--sigma", "0.25"], ["-o", "method.impl=compact", "-o", "method.sigma=0.25"]):
        out = tmp_path / str(len(keys))
        assert main(["run", "--methods", "tr", "--tasks", "2", "--out", str(out), *TINY_ARGS, *flags]) == 0
        (path,) = (out / "runs").glob("*.json")
        keys.append(json.loads(path.read_text())["key"])
    assert keys[0] == keys[1]


def test_default_budget_comes_from_the_dataset_and_is_recorded(tmp_path, capsys):
    from mtlbench.registry import DATASETS
    args = [a for a in TINY_ARGS if a not in ("--steps-per-task", "2")]
    assert main(["run", "--methods", "hard", "--tasks", "2", "--out", str(tmp_path), *args]) == 0
    (path,) = (tmp_path / "runs").glob("*.json")
    run = json.loads(path.read_text())
    default = DATASETS.get("synthetic").default_budget
    assert run["config"]["epochs"] == default["epochs"] and run["config"]["steps_per_task"] is None
    assert run["train"]["budget"]["dataset_default"] == default
