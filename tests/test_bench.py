"""``mtlbench bench --quick --json`` reports every figure as a finite number (no thresholds)."""
from __future__ import annotations

import json
import math

import pytest

from mtlbench.cli import main
from mtlbench.measure import median_ratio, time_turns

from helpers import TINY_ARGS


def _flatten(prefix, value):
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _flatten(f"{prefix}.{k}", v)]
    return [(prefix, value)]


@pytest.mark.slow
def test_bench_quick_json_has_every_key(capsys):
    assert main(["bench", "--quick", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    methods = figures["methods"]
    assert set(methods) == {"tr", "stl", "cross-stitch"}  # the methods with figures of their own
    assert set(methods["tr"]["compact_speedup"]) == {"0.5", "0.25", "0.75"}
    assert set(methods["tr"]["all_task_inference_by_mode"]) == {"loop", "grouped"}
    assert set(methods["cross-stitch"]["columns_grouped_speedup"]) == {"cross_stitch_step_T2"}
    assert set(methods["stl"]["columns_grouped_speedup"]) == {"stl_all_task_inference_T2"}
    from mtlbench.registry import WEIGHTINGS
    for tasks in ("T2", "T4"):
        assert set(figures["weighting_step_s"][tasks]) == set(WEIGHTINGS.names())
        assert figures["weighting_step_s"][tasks]["ew"]["over_ew"] > 0
    flat = dict(_flatten("methods", methods) + _flatten("weighting_step_s", figures["weighting_step_s"]))
    flat.update({k: figures[k] for k in ("ceiling_gflops", "train_gflops", "train_fraction_of_ceiling",
                                          "data_fraction_of_step")})
    for name, value in flat.items():
        assert isinstance(value, float) and math.isfinite(value) and value > 0, name
    # the ceiling is the best candidate, and the training step's fraction of it is the smallest
    assert figures["ceiling_gflops"] == max(figures["ceiling_candidates_gflops"].values())
    assert len(figures["ceiling_candidates_gflops"]) >= 3
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
    assert run["method_details"]["impl"] == "compact" and run["config"]["method_options"]["impl"] == "compact"


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
