"""The training protocol: equal budgets in epochs, the validation carve, selection on validation,
learning-rate schedules, early stopping, class weighting and the threshold-free metrics."""
from __future__ import annotations

import collections
import dataclasses
import math

import pytest
import torch

from mtlbench import engine
from mtlbench.config import RunConfig, setting_key
from mtlbench.data import Batches, positive_weights
from mtlbench.engine import build_method, eval_steps, execute, load_data, lr_factor, make_budget, train
from mtlbench.errors import MtlbenchError
from mtlbench.method import SCHEDULES, Budget
from mtlbench.metrics import auroc, average_precision, binary_metrics
from mtlbench.registry import METHODS

from helpers import tiny_config, with_method


class CountingBatches(Batches):
    """Batches that remember which images each call handed out."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.handed: list[torch.Tensor] = []

    def get(self, k: int):
        epoch, pos = divmod(k, self.per_epoch)
        x, y = super().get(k)
        self.handed.append(self._perms[epoch][pos * self.batch_size:(pos + 1) * self.batch_size].clone())
        return x, y


SCHEDULED = [("tr", {}), ("tr", {"stream": "aligned"}), ("tr", {"schedule": "all"}), ("hard", {}), ("separate", {}), ("cross-stitch", {}),
             ("stl", {})]


@pytest.mark.parametrize("method,options", SCHEDULED, ids=[f"{m}-{o}" for m, o in SCHEDULED])
def test_an_epoch_budget_shows_every_task_each_training_image_that_many_times(method, options):
    epochs, n, batch = 2, 96, 16  # 96 images, 6 batches per epoch (no partial batch)
    cfg = with_method(tiny_config(tasks=3, steps_per_task=None, epochs=epochs, batch_size=batch, val_fraction=0.0,
                                  dataset_options={"num_train": n, "num_test": 32, "image_size": 8}),
                      method, **options)
    data = load_data(cfg)
    model = build_method(cfg, 3)
    batches = CountingBatches(data.train.images, data.train.labels, batch, 0, data.train.mean, data.train.std)
    supervised = collections.defaultdict(collections.Counter)
    real = model.train_step

    def counting(x, y, tasks, trainer):
        for t in tasks:
            supervised[t].update(batches.handed[-1].tolist())
        return real(x, y, tasks, trainer)

    model.train_step = counting
    record = train(model, batches, cfg, make_budget(cfg, len(data.train)))
    for t in range(3):  # every task, every image, exactly `epochs` times
        assert supervised[t] == {i: epochs for i in range(n)}, (method, t)
    assert record["supervised_pairs"] == 3 * epochs * n


def test_the_paper_schedule_draws_a_fresh_batch_and_an_iid_task_each_step():
    cfg = with_method(tiny_config(tasks=4, steps_per_task=None, epochs=3), "tr", schedule="paper")
    model = build_method(cfg, 3)
    budget = Budget(30, 10, 3.0)
    steps = list(model.schedule(budget, torch.Generator().manual_seed(0)))
    assert [k for _, k in steps] == list(range(30))  # E passes over the data in all, one batch per step
    counts = collections.Counter(t for tasks, _ in steps for t in tasks)
    assert all(len(tasks) == 1 for tasks, _ in steps) and set(counts) <= set(range(4))
    long = list(model.schedule(Budget(4000, 1000, 4.0), torch.Generator().manual_seed(1)))
    share = collections.Counter(tasks[0] for tasks, _ in long)
    assert all(abs(share[t] / 4000 - 0.25) < 0.03 for t in range(4))  # about 1/T of the data per task
    assert len(set(share.values())) > 1  # i.i.d., not the balanced pool of `sample`
    sample = with_method(cfg, "tr", schedule="sample")
    pool = collections.Counter(t[0] for t, _ in build_method(sample, 3).schedule(Budget(25, 10), torch.Generator()))
    assert set(pool.values()) == {25}  # `sample`: exactly the budget for every task


@pytest.mark.parametrize("stream", ["staggered", "aligned"])
def test_sample_hands_every_task_each_batch_of_its_budget_once(stream):
    budget = Budget(30, 10, 3.0)
    steps = list(SCHEDULES["sample"].run(7, budget, torch.Generator().manual_seed(0), stream=stream))
    by_task = collections.defaultdict(list)
    for tasks, k in steps:
        by_task[tasks[0]].append(k)
    assert all(sorted(ks) == list(range(30)) for ks in by_task.values()) and len(by_task) == 7
    if stream == "aligned":  # a task's k-th step is batch k
        assert all(ks == list(range(30)) for ks in by_task.values())
    else:  # task t starts at t * N // T and wraps round
        assert all(ks == [(k + t * 30 // 7) % 30 for k in range(30)] for t, ks in by_task.items())


def test_the_staggered_stream_spreads_the_last_steps_over_many_batches():
    """The defect it fixes: with aligned streams every task ends on the stream's last batches."""
    def distinct_at_end(stream):
        steps = list(SCHEDULES["sample"].run(40, Budget(700, 100, 7.0), torch.Generator().manual_seed(0), stream=stream))
        return len({k for _, k in steps[-20:]})  # about a momentum-0.1 running average's reach
    assert distinct_at_end("aligned") <= 4
    assert distinct_at_end("staggered") == 20


def test_shared_norm_statistics_fit_the_training_data_at_the_end_of_a_staggered_run():
    """tr at sigma=1 under ``sample``: the first norm's running mean (shared by every task) against
    its input's mean over the whole training set, with the final weights, in units of its std."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # restored below: the thread count is process-wide
    errors = {}
    try:
        _shared_norm_errors(errors)
    finally:
        torch.set_num_threads(threads)
    assert errors["staggered"] < 0.5 * errors["aligned"], errors


def _shared_norm_errors(errors: dict) -> None:
    for stream in ("aligned", "staggered"):
        cfg = with_method(tiny_config(tasks=16, steps_per_task=None, epochs=2, batch_size=8, val_fraction=0.0,
                                      dataset_options={"num_train": 400, "num_test": 32, "image_size": 8}),
                          "tr", sigma=1.0, stream=stream)
        data = load_data(cfg)
        model = build_method(cfg, data.train.images.shape[1])
        batches = Batches(data.train.images, data.train.labels, cfg.batch_size, cfg.seed, data.train.mean,
                          data.train.std)
        train(model, batches, cfg, make_budget(cfg, len(data.train)))
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        norm = next(m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
        assert norm.running_mean.dim() == 1  # one row: the image does not depend on the task
        with torch.no_grad():
            f = conv(batches.normalise(data.train.images).contiguous())
        mean, std = f.mean(dim=(0, 2, 3)), f.std(dim=(0, 2, 3))
        errors[stream] = float(((norm.running_mean - mean).abs() / std).mean())


def test_stream_is_recorded_only_under_sample_and_old_sample_runs_read_as_aligned():
    tr = METHODS.get("tr")
    assert tr.resolve_options({})["stream"] == "staggered"
    assert "stream" not in tr.resolve_options({"schedule": "all"})
    assert "stream" not in METHODS.get("hard").resolve_options({"stream": "aligned"})
    with pytest.raises(MtlbenchError, match="stream must be one of"):
        tr.resolve_options({"stream": "shifted"})
    assert tr.label(tr.resolve_options({"stream": "aligned", "sigma": 1.0})) == "tr σ=1 stream=aligned"
    config = with_method(tiny_config(), "tr", stream="aligned").to_dict()
    old = dataclasses.replace(tiny_config(), method="tr", method_options={
        k: v for k, v in config["method_options"].items() if k != "stream"}).to_dict()  # a file from before
    new = with_method(tiny_config(), "tr").to_dict()
    assert setting_key(old) == setting_key(config) != setting_key(new)


def test_a_run_file_from_before_the_stream_option_gets_its_settings_label(tmp_path):
    """Read beside a new ``stream=aligned`` run of the same setting, an old file (no ``stream``,
    labelled without it) carries the same label, so tables and per-group figures show one row."""
    import json

    from mtlbench import breakdown
    from mtlbench.aggregate import aggregate
    from mtlbench.results import SCHEMA, load_runs, table
    new = with_method(tiny_config(), "tr", stream="aligned").to_dict()
    old = {**new, "method_options": {k: v for k, v in new["method_options"].items() if k != "stream"}}
    (tmp_path / "runs").mkdir()
    for seed, config, label in ((0, old, "tr σ=0.5"), (1, new, "tr σ=0.5 stream=aligned")):
        run = {"schema": SCHEMA, "key": f"k{seed}", "label": label, "status": "ok", "config": {**config, "seed": seed},
               "metrics": {"mean_balanced_accuracy": 0.9, "balanced_accuracy": [0.9] * config["tasks"]}}
        (tmp_path / "runs" / f"r{seed}.json").write_text(json.dumps(run))
    runs = load_runs(tmp_path)
    assert {r["label"] for r in runs} == {"tr σ=0.5 stream=aligned"}
    assert {json.loads(o)["stream"] for o in table(runs)["options"]} == {"aligned"}
    agg = aggregate(table(runs))
    assert len(agg) == 1 and agg["seeds"].iloc[0] == 2
    for r in runs:
        r["data"] = {"task_groups": {"parity": ["odd" if t % 2 else "even" for t in range(new["tasks"])]}}
    assert list(breakdown.group_scores(runs, "balanced_accuracy")["method"]) == ["tr σ=0.5 stream=aligned"]


def test_a_stream_for_methods_that_never_run_sample_is_an_error():
    from mtlbench.harness import expand
    base = dataclasses.replace(tiny_config(), method_options={"stream": "aligned"})
    with pytest.raises(MtlbenchError, match="stream applies to the sample schedule"):
        expand(base, ["hard", "stl"], [3], [0])
    runs = expand(base, ["hard", "tr"], [3], [0])
    assert {c.method: c.method_options.get("stream") for c in runs} == {"hard": None, "tr": "aligned"}


def test_the_validation_carve_is_disjoint_stratified_and_the_same_for_every_method_and_seed():
    base = tiny_config(tasks=5, val_fraction=0.2, dataset_options={"num_train": 500, "num_test": 100, "image_size": 8})
    carves = []
    for method, seed in (("hard", 0), ("tr", 3), ("stl", 7)):
        data = load_data(dataclasses.replace(with_method(base, method), seed=seed))
        carves.append(data)
        assert len(data.val) == pytest.approx(100, abs=5)
        assert data.val.labels.bool().any(dim=0).all() and (~data.val.labels.bool()).any(dim=0).all()
    for data in carves[1:]:
        assert torch.equal(data.val.images, carves[0].val.images)
        assert torch.equal(data.train.images, carves[0].train.images)
    data = carves[0]
    as_rows = lambda imgs: {bytes(i.flatten().tolist()) for i in imgs}  # noqa: E731
    train, val, test = as_rows(data.train.images), as_rows(data.val.images), as_rows(data.test.images)
    assert not (train & val) and not (val & test)
    # one-vs-rest: the carve is stratified per class
    from mtlbench.data import stratified_carve
    labels = torch.nn.functional.one_hot(torch.arange(1000) % 10, 10).to(torch.uint8)
    _, carved = stratified_carve(labels, 0.1, 0)
    assert labels[carved].sum(dim=0).tolist() == [10] * 10


def test_a_task_too_rare_for_the_carve_is_a_clear_error():
    from mtlbench.engine import carve_validation
    from mtlbench.data import TaskDataset

    class Tiny(TaskDataset):
        pass

    ds = Tiny()
    ds.images = torch.zeros(20, 1, 4, 4, dtype=torch.uint8)
    ds.labels = torch.zeros(20, 2, dtype=torch.uint8)
    ds.labels[:10, 0] = 1
    ds.labels[0, 1] = 1  # one positive: cannot be on both sides
    ds.task_names = ["common", "rare"]
    with pytest.raises(MtlbenchError, match="task 'rare' with"):
        carve_validation(ds, 0.2)


def crafted_validation(monkeypatch, scores: list[float]) -> None:
    """The first len(scores) calls of ``engine.means`` (the validation evaluations) report these
    mean balanced accuracies; later calls (the test split) are left alone."""
    queue = list(scores)
    real = engine.means

    def crafted(per_task):
        out = real(per_task)
        if queue:
            out["mean_balanced_accuracy"] = queue.pop(0)
        return out

    monkeypatch.setattr(engine, "means", crafted)


def test_selection_picks_the_best_validation_checkpoint_and_never_looks_at_test(monkeypatch):
    cfg = with_method(tiny_config(tasks=2, steps_per_task=10, eval_every="2"), "hard")
    data = load_data(cfg)
    crafted_validation(monkeypatch, [0.6, 0.9, 0.7, 0.8, 0.5])  # the best: 2nd evaluation, step 4
    result = execute(cfg, data)
    sel = result["train"]["selection"]
    assert sel["best_step"] == 4 and sel["best_value"] == 0.9 and sel["evaluations"] == 5
    assert [p["step"] for p in result["train"]["curve"]] == [2, 4, 6, 8, 10]
    assert result["metrics"]["checkpoint"] == "best validation"
    # the test labels play no part in the choice
    flipped = dataclasses.replace(data, test=data.test.subset(torch.arange(len(data.test))))
    flipped.test.labels = 1 - flipped.test.labels
    crafted_validation(monkeypatch, [0.6, 0.9, 0.7, 0.8, 0.5])
    assert execute(cfg, flipped)["train"]["selection"] == sel


def test_the_selected_checkpoint_is_the_one_evaluated_on_test(monkeypatch):
    cfg = with_method(tiny_config(tasks=2, steps_per_task=6, eval_every="3"), "hard")
    crafted_validation(monkeypatch, [0.9, 0.1])  # the first evaluation (step 3) wins
    captured = {}
    real_train = engine.train

    def spy(model, *args, **kwargs):
        record = real_train(model, *args, **kwargs)
        captured["best"] = {k: v.clone() for k, v in record["best_state"].items()}
        captured["final"] = {k: v.clone() for k, v in model.state_dict().items()}
        captured["model"] = model
        return record

    monkeypatch.setattr(engine, "train", spy)
    result = execute(cfg, load_data(cfg))
    assert result["train"]["selection"]["best_step"] == 3
    assert any(not torch.equal(captured["final"][k], v) for k, v in captured["best"].items())
    for name, value in captured["model"].state_dict().items():  # the model left holds step 3's state
        assert torch.equal(value, captured["best"][name]), name


def test_early_stopping_records_when_and_why(monkeypatch):
    cfg = with_method(tiny_config(tasks=2, steps_per_task=20, eval_every="2", patience=2), "hard")
    crafted_validation(monkeypatch, [0.5, 0.7, 0.6, 0.65])
    result = execute(cfg, load_data(cfg))
    stopped = result["train"]["stopped_early"]
    assert stopped["step"] == 8 and "in 2 evaluations" in stopped["reason"] and "step 4" in stopped["reason"]
    assert result["train"]["steps"] == 8 and result["train"]["steps_planned"] == 20
    assert result["train"]["selection"]["best_step"] == 4


def test_cosine_with_warmup_and_constant_learning_rates():
    assert [lr_factor(s, 100, "constant", 0.05) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    warm = [lr_factor(s, 100, "cosine", 0.05) for s in range(5)]
    assert warm == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6])  # linear over the first 5 steps
    assert lr_factor(5, 100, "cosine", 0.05) == 1.0
    assert lr_factor(5 + 95 // 2, 100, "cosine", 0.05) == pytest.approx(0.5 * (1 + math.cos(math.pi * 47 / 95)))
    assert lr_factor(100, 100, "cosine", 0.05) == pytest.approx(0.0)
    cfg = with_method(tiny_config(tasks=2, steps_per_task=10), "hard")
    curve = execute(cfg, load_data(cfg))["train"]["curve"]
    lrs = [p["lr"] for p in curve]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < 1e-4  # decays to 0 at the end


def test_eval_every_in_steps_epochs_and_auto():
    budget = Budget(batches_per_task=40, per_epoch=10, epochs=4.0)
    assert eval_steps("auto", 40, budget) == [4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
    assert eval_steps("15", 40, budget) == [15, 30, 40]
    assert eval_steps("1ep", 40, budget) == [10, 20, 30, 40]
    assert eval_steps("2ep", 400, budget) == [200, 400]  # sample at T=10: 400 steps for 4 epochs
    with pytest.raises(MtlbenchError):
        eval_steps("sometimes", 40, budget)


def test_positive_weights_balance_the_classes():
    labels = torch.tensor([[1, 0], [0, 0], [0, 1], [0, 1]], dtype=torch.uint8)
    assert positive_weights(labels).tolist() == [3.0, 1.0]
    cfg = with_method(tiny_config(tasks=3, pos_weight="auto"), "hard")
    result = execute(cfg, load_data(cfg))
    rate = torch.tensor(result["data"]["positive_rate_train"])
    assert result["data"]["pos_weight"] == pytest.approx(((1 - rate) / rate).tolist(), rel=1e-5)


def test_auroc_and_average_precision_equal_a_hand_computation():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.55, 0.4])
    positive = torch.tensor([True, False, True, True, False, False])
    # pairs (positive above negative): 0.9 beats 3, 0.7 beats 2, 0.6 beats 2 -> 7 of 9
    assert auroc(scores, positive) == pytest.approx(7 / 9)
    # precision at each positive: 1/1, 2/3, 3/4 -> mean 0.8056
    assert average_precision(scores, positive) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    ties = torch.tensor([0.5, 0.5, 0.2, 0.2])
    pos = torch.tensor([True, False, True, False])
    assert auroc(ties, pos) == pytest.approx(0.5)  # every pair tied or split: one half
    # tied scores enter together: at 0.5 precision 1/2 (recall 1/2), at 0.2 precision 2/4
    assert average_precision(ties, pos) == pytest.approx(0.5 * 0.5 + 0.5 * 0.5)
    m = binary_metrics(torch.stack([scores - 0.65, scores]).t(), torch.stack([positive, torch.ones(6, dtype=torch.bool)]).t())
    assert m["auroc"][0] == pytest.approx(7 / 9) and math.isnan(m["auroc"][1])  # one class only: undefined


def test_delta_m_on_any_metric_and_the_report_names_its_headline(tmp_path, capsys):
    from helpers import TINY_ARGS
    from mtlbench.cli import main
    from mtlbench import results
    assert main(["run", "--methods", "hard,stl", "--tasks", "2", "--out", str(tmp_path / "r"), *TINY_ARGS]) == 0
    runs = results.load_runs(tmp_path / "r")
    table = results.table(runs)
    hard = next(r for r in runs if r["config"]["method"] == "hard")
    stl = next(r for r in runs if r["config"]["method"] == "stl")
    for metric in ("accuracy", "balanced_accuracy", "auroc", "ap"):
        expected = results.delta_m(hard["metrics"][metric], stl["metrics"][metric])
        assert table.loc[table["method"] == "hard", f"delta_m_{metric}"].iloc[0] == pytest.approx(expected)
    assert main(["report", str(tmp_path / "r"), "--out", str(tmp_path / "rep"), "--metric", "auroc"]) == 0
    readme = (tmp_path / "rep" / "README.md").read_text()
    assert "Headline metric: mean AUROC" in readme and "Δm AUROC %" in readme
