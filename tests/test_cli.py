"""``mtlbench run`` end to end with tiny settings, and every bad input as one clear line."""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from mtlbench.cli import main
from mtlbench.results import COLUMNS

from conftest import TINY_ARGS


def run(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_run_end_to_end(tmp_path, capsys):
    out_dir = tmp_path / "res"
    code, out, err = run(["run", "--methods", "tr,hard,stl", "--tasks", "3", "--out", str(out_dir), *TINY_ARGS], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["method", "sigma", "tasks", "seed"]
    assert {l.split()[0] for l in lines[1:4]} == {"tr", "hard", "stl"}
    stl_row = next(l for l in lines if l.startswith("stl"))
    assert "+0.00" in stl_row  # stl against itself
    files = sorted((out_dir / "runs").glob("*.json"))
    assert len(files) == 3
    result = json.loads(files[0].read_text())
    for key in ("config", "metrics", "params", "train", "eval", "environment", "key"):
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
    (["--lr", "fast"], "invalid float"),
    (["--steps-per-task", "0"], "at least 1"),
    (["--schedule", "sometimes"], "applies to none"),
    (["-o", "dataset.colour=red"], "unknown option(s) colour"),
    (["-o", "dataset.relatedness=lots"], "cannot read"),
    (["--device", "tpu"], "device"),
    (["-o", "method.bogus=1"], "unknown method option(s) bogus"),
    (["-o", "method.inference=sideways"], "inference must be one of"),
    (["-o", "method.sigma=0.3"], "set sigma with --sigma"),
    (["-o", "planet.x=1"], "must look like"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, message):
    code, out, err = run(["run", "--tasks", "2", *TINY_ARGS, "--out", str(tmp_path), *extra], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("mtlbench: error:"), err
    assert message in err
    assert "Traceback" not in err


def test_method_options_reach_only_the_methods_that_have_them(tmp_path, capsys):
    code, _, err = run(["run", "--methods", "tr,hard", "--tasks", "2", *TINY_ARGS, "--out", str(tmp_path),
                        "-o", "method.inference=loop"], capsys)
    assert code == 0, err
    runs = {r["config"]["method"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json"))}
    assert runs["tr"]["config"]["method_options"] == {"inference": "loop"}
    assert runs["tr"]["method_details"]["all_task_inference"] == "loop"
    assert runs["hard"]["config"]["method_options"] == {}


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
    for name in ("tr", "hard", "separate", "cross-stitch", "stl", "synthetic", "convnet", "vgg11"):
        assert name in out


def test_run_keys_stay_stable_and_nondeterministic_is_its_own_setting(tmp_path, capsys):
    from mtlbench.config import RunConfig
    # keys of runs written before `deterministic` existed (resuming and compare rely on them)
    assert RunConfig().key() == "f2960b3f4320"
    assert RunConfig(method="stl", sigma=None, tasks=200, device="cuda").key() == "ab47bbaedbfa"
    assert RunConfig(deterministic=False).key() != RunConfig().key()
    assert main(["run", "--methods", "hard", "--tasks", "2", "--nondeterministic", "--out", str(tmp_path),
                 *TINY_ARGS]) == 0
    (path,) = (tmp_path / "runs").glob("*.json")
    run = json.loads(path.read_text())
    assert run["config"]["deterministic"] is False
    assert run["runtime"]["deterministic"] == "cpu kernels (deterministic)"  # nothing to switch on a CPU
