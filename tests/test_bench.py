"""``mtlbench bench --quick --json`` reports every figure as a finite number (no thresholds)."""
from __future__ import annotations

import json
import math

import pytest

from mtlbench.cli import main
from mtlbench.measure import median_ratio, time_turns

from conftest import TINY_ARGS


def test_bench_quick_json_has_every_key(capsys):
    assert main(["bench", "--quick", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    flat = {
        "ceiling_gflops": figures["ceiling_gflops"],
        "train_gflops": figures["train_gflops"],
        "train_fraction_of_ceiling": figures["train_fraction_of_ceiling"],
        "tr_compact_speedup.0.5": figures["tr_compact_speedup"]["0.5"],
        "tr_compact_speedup.0.25": figures["tr_compact_speedup"]["0.25"],
        "tr_all_task_inference_speedup": figures["tr_all_task_inference_speedup"],
        "tr_compact_over_plain_network": figures["tr_compact_over_plain_network"],
        "data_fraction_of_step": figures["data_fraction_of_step"],
        **{f"cross_stitch.{k}": v for k, v in figures["cross_stitch_step_s_per_task"].items()},
        **{f"inference.{k}": v for k, v in figures["tr_all_task_inference_by_mode"].items()},
        **{f"columns.{k}": v for k, v in figures["columns_grouped_speedup"].items()},
    }
    assert set(figures["tr_all_task_inference_by_mode"]) == {"loop", "grouped"}
    assert set(figures["columns_grouped_speedup"]) == {"cross_stitch_step_T2", "stl_all_task_inference_T2"}
    assert len(figures["cross_stitch_step_s_per_task"]) == 2
    for name, value in flat.items():
        assert isinstance(value, float) and math.isfinite(value) and value > 0, name
    assert figures["setting"]["threads"] >= 1


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_and_is_recorded(tmp_path, capsys, precision):
    assert main(["run", "--methods", "tr,hard", "--tasks", "2", "--precision", precision,
                 "--out", str(tmp_path), *TINY_ARGS]) == 0
    runs = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    assert all(r["status"] == "ok" and r["runtime"]["precision"] == precision for r in runs)
    assert all(r["runtime"]["grad_scaler"] == (precision == "fp16") for r in runs)


def test_tr_impl_is_recorded(tmp_path, capsys):
    assert main(["run", "--methods", "tr", "--tasks", "2", "--tr-impl", "compact", "--out", str(tmp_path),
                 *TINY_ARGS]) == 0
    (path,) = (tmp_path / "runs").glob("*.json")
    run = json.loads(path.read_text())
    assert run["method_details"]["impl"] == "compact" and run["config"]["tr_impl"] == "compact"


def test_turns_alternate_the_calls_and_ratios_pair_them():
    calls = []
    times = time_turns({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, repeats=3)
    assert calls == ["a", "b"] * 4  # one warm-up turn, then three timed turns, in order
    assert [len(v) for v in times.values()] == [3, 3]
    # the median of per-turn ratios, not the ratio of medians (3/1, 2/4, 8/2 -> 3, 0.5, 4)
    assert median_ratio({"x": [3.0, 2.0, 8.0], "y": [1.0, 4.0, 2.0]}, "x", "y") == 3.0


def test_bench_repeats_is_recorded_and_bad_values_are_one_line(capsys):
    assert main(["bench", "--quick", "--json", "--repeats", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["setting"]["repeats"] == 1
    for bad in ("0", "many"):
        assert main(["bench", "--quick", "--repeats", bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("mtlbench: error:") and "--repeats" in err, err
