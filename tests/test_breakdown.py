"""Per-task scores broken down by ground-truth task groups (clusters, noisy vs clean)."""
from __future__ import annotations

import math

import pytest

from mtlbench import breakdown


def run(seed: int, scores: list[float], groups: dict, label: str = "hard", tasks: int | None = None) -> dict:
    return {"status": "ok", "label": label, "config": {"tasks": tasks or len(scores), "seed": seed},
            "metrics": {"balanced_accuracy": scores}, "data": {"task_groups": groups}}


def test_noisy_and_clean_tasks_are_averaged_apart_then_over_seeds():
    noise = {"noise": ["clean", "noisy", "clean", "noisy"]}
    runs = [run(0, [0.9, 0.5, 0.8, 0.6], noise), run(1, [1.0, 0.5, 0.9, 0.4], noise)]
    df = breakdown.group_scores(runs, "balanced_accuracy")
    row = df.iloc[0]
    assert (row["grouping"], row["groups"], row["seeds"]) == ("noise", 2, 2)
    assert row["clean mean"] == pytest.approx((0.85 + 0.95) / 2)
    assert row["noisy mean"] == pytest.approx(0.5)
    assert row["clean ci95"] == pytest.approx(12.706 * (0.1 / math.sqrt(2)) / math.sqrt(2))
    assert "| 4 | hard | noise | 2 | 2 | 90.00 ± " in breakdown.markdown(df)


def test_many_groups_are_summarised_by_mean_worst_and_best():
    clusters = {"cluster": [f"cluster {t // 2}" for t in range(10)]}
    scores = [0.9, 0.9, 0.8, 0.8, 0.7, 0.7, 0.6, 0.6, 1.0, 1.0]
    row = breakdown.group_scores([run(0, scores, clusters)], "balanced_accuracy").iloc[0]
    assert row["groups"] == 5 and row["worst group mean"] == pytest.approx(0.6)
    assert row["best group mean"] == pytest.approx(1.0) and row["mean of groups mean"] == pytest.approx(0.8)


def test_runs_without_groups_give_an_empty_table():
    assert breakdown.group_scores([run(0, [0.9], {})], "balanced_accuracy").empty


def test_labels_of_settings_that_differ_in_a_dataset_option_name_the_option():
    import json

    import pandas as pd

    from mtlbench.aggregate import distinct_labels

    def row(key, fraction, tasks=40, lr=0.003):
        config = {"method": "hard", "method_options": {}, "dataset": "synthetic", "tasks": tasks, "lr": lr,
                  "dataset_options": {"regime": "noisy", "noisy_fraction": fraction}}
        return {"key": key, "label": "hard", "tasks": tasks, "setting": json.dumps(config, sort_keys=True),
                "setting_config": json.dumps(config, sort_keys=True)}

    df = pd.DataFrame([row("a", 0.25), row("b", 0.25), row("c", 0.5), row("d", 0.5, tasks=10)])
    labels = distinct_labels(df).set_index("key")["label"]
    assert labels.to_dict() == {"a": "hard noisy_fraction=0.25", "b": "hard noisy_fraction=0.25",
                                "c": "hard noisy_fraction=0.5", "d": "hard"}
