"""The built-in synthetic dataset: deterministic, balanced, learnable, relatedness works."""
from __future__ import annotations

import dataclasses
import hashlib
import math

import pytest
import torch

from mtlbench.datasets.synthetic import MAX_TASKS, Synthetic, SyntheticConfig
from mtlbench.engine import execute
from mtlbench.errors import MtlbenchError

from helpers import with_method

SMALL = SyntheticConfig(num_train=400, num_test=300, image_size=16)


def test_same_seed_same_images_and_labels():
    a, b = Synthetic(split="train", num_tasks=20, config=SMALL), Synthetic(split="train", num_tasks=20, config=SMALL)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    c = Synthetic(split="train", num_tasks=20, config=dataclasses.replace(SMALL, data_seed=1))
    assert not torch.equal(a.images, c.images)


def test_splits_differ_and_have_the_requested_sizes():
    train, test = (Synthetic(split=s, num_tasks=5, config=SMALL) for s in ("train", "test"))
    assert train.images.shape == (400, 3, 16, 16) and test.images.shape == (300, 3, 16, 16)
    assert train.images.dtype == torch.uint8 and test.labels.shape == (300, 5)
    assert not torch.equal(train.images[:300], test.images)


def test_thousands_of_roughly_balanced_tasks():
    data = Synthetic(split="train", num_tasks=MAX_TASKS, config=dataclasses.replace(SMALL, num_train=4000))
    assert MAX_TASKS >= 1000 and data.num_tasks == MAX_TASKS
    rate = data.labels.float().mean(dim=0)
    assert 0.40 < rate.min() and rate.max() < 0.60


def test_first_tasks_do_not_depend_on_how_many_are_asked_for():
    few = Synthetic(split="test", num_tasks=5, config=SMALL)
    many = Synthetic(split="test", num_tasks=50, config=SMALL)
    assert torch.equal(few.labels, many.labels[:, :5])


def mean_abs_label_correlation(relatedness: float) -> float:
    cfg = dataclasses.replace(SMALL, relatedness=relatedness, num_test=2000)
    labels = Synthetic(split="test", num_tasks=30, config=cfg).labels.float()
    corr = torch.corrcoef(labels.t()).abs()
    return ((corr.sum() - 30) / (30 * 29)).item()


def test_relatedness_controls_label_correlation():
    c0, c5, c1 = (mean_abs_label_correlation(r) for r in (0.0, 0.5, 1.0))
    assert c0 < c5 < c1
    assert c1 > 0.99 and c0 < 0.3


def test_bad_options_and_splits_are_clear_errors():
    with pytest.raises(MtlbenchError, match="valid splits: train, test"):
        Synthetic(split="val", num_tasks=3)
    with pytest.raises(MtlbenchError, match="1 to 4096 tasks"):
        Synthetic(split="train", num_tasks=MAX_TASKS + 1)
    with pytest.raises(MtlbenchError, match="relatedness"):
        Synthetic(split="train", num_tasks=3, config=dataclasses.replace(SMALL, relatedness=2.0))


def test_tasks_are_learnable_hard_beats_chance(tiny_config):
    cfg = dataclasses.replace(tiny_config, tasks=5, steps_per_task=80, batch_size=32, lr=3e-3,
                              dataset_options={"num_train": 2560, "num_test": 500}, backbone_options={})
    cfg = with_method(cfg, "hard")
    from mtlbench.engine import load_data
    metrics = execute(cfg, load_data(cfg))["metrics"]
    assert metrics["mean_balanced_accuracy"] > 0.70, metrics  # chance is 0.5


# ---- regimes (issue: a synthetic suite whose regimes are known) ----------------------------

from mtlbench.datasets.synthetic import REGIMES, noisy_tasks, true_factors  # noqa: E402


def regime(name: str, tasks: int = 20, split: str = "train", **options) -> Synthetic:
    cfg = SyntheticConfig(regime=name, num_train=options.pop("num_train", 2000), num_test=500, image_size=16,
                          **options)
    return Synthetic(split=split, num_tasks=tasks, config=cfg)


def test_default_regime_data_is_unchanged():
    # Checksum of the data the generator made before regimes existed (same config, same torch):
    # results computed on the default dataset stay valid.
    data = Synthetic(split="train", num_tasks=20, config=SMALL)
    digest = hashlib.sha256(data.images.numpy().tobytes() + data.labels.numpy().tobytes()).hexdigest()
    assert digest[:16] == "7ad309653a783b10"
    assert torch.equal(data.labels, regime("default", num_train=400).labels)


@pytest.mark.parametrize("name", list(REGIMES))
def test_every_regime_is_deterministic_and_near_balanced(name):
    a, b = regime(name), regime(name)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.task_info == b.task_info and len(a.task_info) == 20
    rate = a.labels.float().mean(dim=0)
    assert 0.25 < rate.min() and rate.max() < 0.75, rate
    other = regime(name, data_seed=1)
    assert not torch.equal(a.labels, other.labels)


@pytest.mark.parametrize("name", list(REGIMES))
def test_regime_tasks_do_not_depend_on_how_many_are_asked_for(name):
    few, many = regime(name, tasks=6), regime(name, tasks=30)
    assert torch.equal(few.labels, many.labels[:, :6]) and few.task_info == many.task_info[:6]


def test_mixed_clusters_are_recorded_and_related_within():
    data = regime("mixed", tasks=20, num_train=4000)
    assert [i["cluster"] for i in data.task_info] == [t // 5 for t in range(20)]
    assert data.task_groups["cluster"][:6] == ["cluster 0"] * 5 + ["cluster 1"]
    corr = torch.corrcoef(data.labels.float().t()).abs()
    cluster = torch.tensor([t // 5 for t in range(20)])
    same = (cluster[:, None] == cluster[None]) & ~torch.eye(20, dtype=torch.bool)
    assert corr[same].mean() > 0.3 > 0.1 > corr[cluster[:, None] != cluster[None]].mean()
    two = regime("mixed", tasks=20, cluster_size=2)
    assert [i["cluster"] for i in two.task_info][:5] == [0, 0, 1, 1, 2]


def test_noisy_tasks_are_the_declared_fraction_and_flip_at_the_declared_rate():
    assert sum(noisy_tasks(40, 0.25)) == 10 and sum(noisy_tasks(200, 0.5)) == 100
    small, large = noisy_tasks(40, 0.25), noisy_tasks(40, 0.75)
    assert all(b for a, b in zip(small, large) if a)  # a larger fraction keeps the smaller's
    clean = regime("noisy", tasks=20, num_train=4000, noisy_fraction=0.0)
    for p in (0.5, 0.2):
        noisy = regime("noisy", tasks=20, num_train=4000, noisy_fraction=0.25, label_noise=p)
        flags = [i["noisy"] for i in noisy.task_info]
        assert sum(flags) == 5 and noisy.task_groups["noise"].count("noisy") == 5
        flipped = (noisy.labels != clean.labels).float().mean(dim=0)
        assert flipped[torch.tensor(flags)].sub(p).abs().max() < 0.04
        assert flipped[~torch.tensor(flags)].max() == 0  # clean tasks untouched


def test_transfer_training_labels_flip_at_the_declared_rate_and_test_labels_stay_clean():
    noisy, clean = regime("transfer", tasks=20, num_train=4000), regime("transfer", tasks=20, num_train=4000,
                                                                          train_label_noise=0.0)
    flipped = (noisy.labels != clean.labels).float().mean(dim=0)
    assert flipped.sub(0.2).abs().max() < 0.03  # every task, about 0.2
    assert torch.corrcoef((noisy.labels != clean.labels).float().t()).fill_diagonal_(0).abs().max() < 0.1  # independent
    assert all(i["train_label_noise"] == 0.2 for i in noisy.task_info)
    test = Synthetic(split="test", num_tasks=20, config=SyntheticConfig(regime="transfer", num_test=500))
    exact = Synthetic(split="test", num_tasks=20, config=SyntheticConfig(regime="transfer", num_test=500,
                                                                         train_label_noise=0.0))
    assert torch.equal(test.labels, exact.labels)
    assert Synthetic.canonical_options({"regime": "transfer"})["train_label_noise"] == 0.2
    assert "train_label_noise" not in Synthetic.canonical_options({"regime": "interference"})  # keys unchanged


def test_capacity_tasks_are_distinct_xors_of_the_declared_gratings():
    from mtlbench.datasets.synthetic import GRATING_NAMES, GRATINGS
    cfg = SyntheticConfig(regime="capacity", num_train=3000, image_size=16)
    data = Synthetic(split="train", num_tasks=300, config=cfg)
    bits = true_factors(cfg, "train") > 0  # standardised presence bits
    pairs = [tuple(GRATING_NAMES.index(f) for f in i["factors"]) for i in data.task_info]
    for t in range(300):
        i, j = pairs[t]
        assert torch.equal(data.labels[:, t].bool(), bits[:, i] ^ bits[:, j])
    assert len(set(pairs[:276])) == 276 and pairs[276] == pairs[0]  # all 276 pairs, then repeats
    corr = torch.corrcoef(data.labels[:, :276].float().t()).fill_diagonal_(0).abs()
    assert corr.mean() < 0.05 and corr.max() < 0.3  # tasks share almost nothing
    # Every grating is in the image: its energy at its own colour, orientation and frequency
    # separates present from absent without a single error.
    x = data.images.float() / 255 - 0.5
    grid = (torch.arange(16) + 0.5) / 16
    for k, (c, o, f) in enumerate(GRATINGS):
        th = math.radians(o)
        arg = 2 * math.pi * f * (math.cos(th) * grid.view(1, -1) + math.sin(th) * grid.view(-1, 1))
        energy = (x[:, c] * arg.cos()).sum((1, 2)).square() + (x[:, c] * arg.sin()).sum((1, 2)).square()
        assert energy[bits[:, k]].min() > 2 * energy[~bits[:, k]].max(), GRATING_NAMES[k]


def _probe(x: torch.Tensor, y: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor, hidden: int) -> float:
    """Train a linear (hidden=0) or one-hidden-layer probe; test balanced accuracy."""
    torch.manual_seed(0)
    net = torch.nn.Linear(x.shape[1], 1) if not hidden else torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(600):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(net(x).squeeze(1), y).backward()
        opt.step()
    pred = net(xt).squeeze(1) > 0
    pos = yt.bool()
    return 0.5 * ((pred & pos).sum() / pos.sum() + (~pred & ~pos).sum() / (~pos).sum()).item()


@pytest.mark.parametrize("name", ["default", "transfer", "interference", "capacity"])
def test_probes_on_the_true_factors_reach_the_ceiling(name):
    # Labels are exact functions of the factors: a linear probe reaches ~100% on linear tasks,
    # and on XOR tasks only a nonlinear probe does (a linear one stays far below): the XOR
    # regimes' tasks really need features of their own. In ``capacity`` a grating present with
    # chance 0.3 or 0.7 makes part of an XOR linear in the bits, so only the mean is below 0.8
    # there (its first four tasks: 0.69, 0.64, 0.83, 0.69).
    cfg = SyntheticConfig(regime=name, num_train=3000, num_test=1000, train_label_noise=0.0)  # exact labels
    train, test = (Synthetic(split=s, num_tasks=4, config=cfg) for s in ("train", "test"))
    x, xt = true_factors(cfg, "train"), true_factors(cfg, "test")
    linears = []
    for t in range(4):
        y, yt = train.labels[:, t].float(), test.labels[:, t].float()
        linear, mlp = _probe(x, y, xt, yt, 0), _probe(x, y, xt, yt, 32)
        linears.append(linear)
        if REGIMES[name].kind == "linear":
            assert linear > 0.97, (t, linear)
        else:
            assert mlp > 0.93 and (linear < 0.8 or name == "capacity"), (t, linear, mlp)
    assert REGIMES[name].kind == "linear" or sum(linears) / 4 < 0.8, linears


@pytest.mark.parametrize("name", list(REGIMES))
def test_a_clean_task_of_every_regime_is_learnable_on_a_short_budget(tiny_config, name):
    cfg = dataclasses.replace(tiny_config, tasks=1, steps_per_task=150, batch_size=32, lr=3e-3,
                              dataset_options={"regime": name, "num_train": 2000, "num_test": 500,
                                               "image_size": 16}, backbone_options={})
    from mtlbench.engine import load_data
    metrics = execute(with_method(cfg, "stl"), load_data(cfg))["metrics"]
    assert metrics["mean_balanced_accuracy"] > 0.70, metrics  # chance is 0.5; task0000 is clean


def test_regimes_declare_their_budget_and_bad_regimes_are_clear_errors():
    assert Synthetic.budget_for(SyntheticConfig()) == {"epochs": 4}
    assert Synthetic.budget_for(SyntheticConfig(regime="transfer")) == REGIMES["transfer"].budget
    with pytest.raises(MtlbenchError, match="unknown regime 'xor'; valid: default, transfer"):
        Synthetic(split="train", num_tasks=3, config=SyntheticConfig(regime="xor"))
    with pytest.raises(MtlbenchError, match="cluster_size"):
        regime("mixed", cluster_size=0)
    with pytest.raises(MtlbenchError, match="label_noise"):
        regime("noisy", label_noise=0.7)


def test_optional_options_read_from_the_command_line():
    from mtlbench.config import make_config
    cfg = make_config(SyntheticConfig, {"num_train": "500", "relatedness": "none", "regime": "mixed"}, "synthetic")
    assert cfg.num_train == 500 and cfg.relatedness is None and cfg.regime == "mixed"
    with pytest.raises(MtlbenchError, match="cannot read 'many' as int"):
        make_config(SyntheticConfig, {"num_train": "many"}, "synthetic")
