"""Real-dataset plugins on small fake files in each real on-disk format."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from mtlbench.config import RunConfig
from mtlbench.engine import execute, load_data
from mtlbench.errors import MtlbenchError
from mtlbench.registry import DATASETS
from mtlbench.vision import VisionConfig

import fakedata

NOCHECK = VisionConfig(verify=False)
TRUSTED = VisionConfig(verify=False, trust_data=True)  # pickled formats: unverified only when trusted


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MTLBENCH_CACHE", str(tmp_path / "cache"))


def make(name, root, split="train", num_tasks=10, config=None, **kw):
    return DATASETS.get(name)(root, split, num_tasks=num_tasks, config=config or DATASETS.get(name).config_class(), **kw)


# ---------------------------------------------------------------- MNIST and Fashion-MNIST
@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_datasets(tmp_path, name, folder, gz):
    labels = [3, 1, 4, 1, 5, 9, 2, 6]
    fakedata.write_idx(tmp_path / folder / "raw", "t10k", labels, gz=gz)
    ds = make(name, tmp_path, "test")
    assert len(ds) == 8 and ds.images.shape == (8, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.num_tasks == 10 and len(ds.task_names) == 10
    assert torch.equal(ds.labels.argmax(dim=1), torch.tensor(labels)) and (ds.labels.sum(dim=1) == 1).all()
    if name == "mnist":
        assert ds.task_names[:3] == ["digit_0", "digit_1", "digit_2"]
    else:
        assert ds.task_names[1] == "trouser"
    assert ds.positive_rate()[1] == pytest.approx(2 / 8)


def test_idx_lowercase_layout_and_only_test_files_with_holdout(tmp_path):
    fakedata.write_idx(tmp_path / "mnist" / "raw", "t10k", list(range(10)) * 4, gz=True)
    cfg = RunConfig(dataset="mnist", tasks=10, holdout=0.25, holdout_split="test", val_fraction=0.0)
    data = load_data(cfg, str(tmp_path))
    assert len(data.train) == 30 and len(data.test) == 10 and data.val is None
    again = load_data(cfg, str(tmp_path))
    assert torch.equal(data.train.images, again.train.images)  # the carve is seeded
    assert not (tmp_path / "mnist" / "raw" / "t10k-images-idx3-ubyte").exists()  # data folder untouched


def test_idx_missing_files(tmp_path):
    with pytest.raises(MtlbenchError, match=r"missing t10k-images-idx3-ubyte\[\.gz\].*--download"):
        make("mnist", tmp_path, "test")
    fakedata.write_idx(tmp_path / "MNIST" / "raw", "t10k", [1, 2])
    with pytest.raises(MtlbenchError, match="missing train-images"):
        make("mnist", tmp_path, "train")  # test files alone do not make a training split


def test_idx_corrupt_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    fakedata.write_idx(raw, "t10k", [1, 2, 3, 4])
    blob = (raw / "t10k-images-idx3-ubyte").read_bytes()
    (raw / "t10k-images-idx3-ubyte").write_bytes(blob[:-100])
    with pytest.raises(MtlbenchError, match="corrupt or truncated"):
        make("mnist", tmp_path, "test")
    gz = tmp_path / "g" / "MNIST" / "raw"
    fakedata.write_idx(gz, "t10k", [1, 2, 3, 4], gz=True)
    data = (gz / "t10k-images-idx3-ubyte.gz").read_bytes()
    (gz / "t10k-images-idx3-ubyte.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(MtlbenchError, match="t10k-images-idx3-ubyte.gz' is corrupt"):
        make("mnist", tmp_path / "g", "test")


def test_more_tasks_than_available_and_task_names(tmp_path):
    fakedata.write_idx(tmp_path / "MNIST" / "raw", "t10k", [0, 1, 2, 7])
    with pytest.raises(MtlbenchError, match="offers 1 to 10 tasks"):
        make("mnist", tmp_path, "test", num_tasks=11)
    ds = make("mnist", tmp_path, "test", task_names=["digit_7", "digit_0"])
    assert ds.task_names == ["digit_7", "digit_0"] and ds.labels[:, 0].tolist() == [0, 0, 0, 1]
    with pytest.raises(MtlbenchError, match="did you mean digit_7"):
        make("mnist", tmp_path, "test", task_names=["digit7"])


# ---------------------------------------------------------------- CIFAR
@pytest.mark.parametrize("hundred", [False, True])
def test_cifar(tmp_path, hundred):
    name = "cifar100" if hundred else "cifar10"
    fakedata.write_cifar(tmp_path, hundred, [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]], [9, 8, 7])
    train = make(name, tmp_path, "train", num_tasks=100 if hundred else 10, config=TRUSTED)
    test = make(name, tmp_path, "test", num_tasks=5, config=TRUSTED)
    assert len(train) == 10 and train.images.shape == (10, 3, 32, 32)
    assert torch.equal(train.labels.argmax(dim=1), torch.arange(10))
    assert len(test) == 3 and test.num_tasks == 5 and test.labels.sum() == 0  # 9, 8, 7 are past task 5
    assert test.task_names == ([f"class{i:02d}" for i in range(5)] if hundred else
                               ["airplane", "automobile", "bird", "cat", "deer"])
    with pytest.raises(MtlbenchError, match=f"offers 1 to {100 if hundred else 10} tasks"):
        make(name, tmp_path, "test", num_tasks=101 if hundred else 11, config=TRUSTED)


def test_cifar_missing_corrupt_and_checksum(tmp_path):
    with pytest.raises(MtlbenchError, match="missing test_batch, batches.meta"):
        make("cifar10", tmp_path, "test", config=TRUSTED)
    folder = fakedata.write_cifar(tmp_path, False, [[0]] * 5, [1, 2])
    with pytest.raises(MtlbenchError, match="test_batch' fails its MD5 check"):
        make("cifar10", tmp_path, "test")  # the fake file is not the published one
    (folder / "test_batch").write_bytes((folder / "test_batch").read_bytes()[:50])
    with pytest.raises(MtlbenchError, match="corrupt or truncated"):
        make("cifar10", tmp_path, "test", config=TRUSTED)


def test_cifar_pickles_are_never_loaded_unverified_without_trust(tmp_path):
    """A planted pickle runs code when loaded: verify=false alone is refused, and the MD5
    error does not suggest skipping the check."""
    folder = fakedata.write_cifar(tmp_path, False, [[0]] * 5, [1, 2])
    marker = tmp_path / "ran"

    class Planted:
        def __reduce__(self):
            return (marker.touch, ())

    import pickle
    pickle.dump(Planted(), open(folder / "test_batch", "wb"))
    with pytest.raises(MtlbenchError, match="fails its MD5 check") as err:
        make("cifar10", tmp_path, "test")
    assert "verify=false" not in str(err.value) and not marker.exists()
    for name in ("cifar10", "cifar100"):
        with pytest.raises(MtlbenchError, match="pickles.*refused unless --trust-data"):
            make(name, tmp_path, "test", config=NOCHECK)
    assert not marker.exists()
    with pytest.raises(MtlbenchError):  # explicitly trusted: loaded, and the plant ran (what the flag risks)
        make("cifar10", tmp_path, "test", config=TRUSTED)
    assert marker.exists()


def test_cli_trust_data_flag_sets_the_option_and_says_the_risk(tmp_path, capsys):
    from mtlbench.cli import main
    fakedata.write_cifar(tmp_path, False, [[0]] * 5, [1, 2])
    args = ["run", "--dataset", "cifar10", "--data-root", str(tmp_path), "--out", str(tmp_path / "o"),
            "-o", "dataset.verify=false", "--holdout", "0.5", "--holdout-split", "test"]
    assert main(args) == 2
    assert "refused unless --trust-data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "runs arbitrary code" in " ".join(capsys.readouterr().out.split())


# ---------------------------------------------------------------- CelebA
def test_celeba(tmp_path):
    rng = np.random.default_rng(0)
    attrs = rng.choice([-1, 1], size=(6, 40))
    fakedata.write_celeba(tmp_path, attrs, partition=[0, 0, 0, 1, 2, 2])
    train = make("celeba", tmp_path, "train", num_tasks=40, config=NOCHECK)
    test = make("celeba", tmp_path, "test", num_tasks=3, config=NOCHECK)
    assert len(train) == 3 and train.images.shape == (3, 3, 64, 64)
    assert torch.equal(train.labels, torch.tensor((attrs[:3] + 1) // 2, dtype=torch.uint8))
    assert test.task_names == ["Attr_00", "Attr_01", "Attr_02"] and len(test) == 2
    with pytest.raises(MtlbenchError, match="offers 1 to 40 tasks"):
        make("celeba", tmp_path, "test", num_tasks=41, config=NOCHECK)
    with pytest.raises(MtlbenchError, match="list_attr_celeba.txt' fails its MD5 check"):
        make("celeba", tmp_path, "test")


def test_celeba_missing_and_corrupt(tmp_path):
    with pytest.raises(MtlbenchError, match="missing list_attr_celeba.txt.*img_align_celeba"):
        make("celeba", tmp_path, "train", config=NOCHECK)
    folder = fakedata.write_celeba(tmp_path, np.ones((3, 40), dtype=int), [0, 0, 0])
    (folder / "img_align_celeba" / "000002.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(MtlbenchError, match="000002.jpg' is corrupt"):
        make("celeba", tmp_path / "", "train", config=dataclasses.replace(NOCHECK, image_size=32))


# ---------------------------------------------------------------- CUB-200-2011
def test_cub200(tmp_path):
    present = np.random.default_rng(1).integers(0, 2, size=(5, 312))
    fakedata.write_cub(tmp_path, present, is_train=[1, 0, 1, 1, 0])
    train = make("cub200", tmp_path, "train", num_tasks=312)
    test = make("cub200", tmp_path, "test", num_tasks=4)
    assert len(train) == 3 and train.num_tasks == 312 and train.images.shape == (3, 3, 64, 64)
    assert torch.equal(train.labels, torch.tensor(present[[0, 2, 3]], dtype=torch.uint8))
    assert test.task_names == [f"has_part::value_{i}" for i in range(1, 5)]
    with pytest.raises(MtlbenchError, match="offers 1 to 312 tasks"):
        make("cub200", tmp_path, "test", num_tasks=313)


def test_cub200_missing_and_truncated(tmp_path):
    with pytest.raises(MtlbenchError, match="no automatic download"):
        make("cub200", tmp_path, "train")
    folder = fakedata.write_cub(tmp_path, np.ones((2, 312), dtype=int), [1, 1], with_names=False)
    labels = folder / "attributes" / "image_attribute_labels.txt"
    labels.write_text("\n".join(labels.read_text().splitlines()[:400]))
    with pytest.raises(MtlbenchError, match="lacks attribute labels"):
        make("cub200", tmp_path, "train")


# ---------------------------------------------------------------- Omniglot
def test_omniglot_extracted_tree_without_zip(tmp_path):
    fakedata.write_omniglot(tmp_path, {"Alpha": ["character01", "character02"], "Beta": ["character01"]})
    train = make("omniglot", tmp_path, "train", num_tasks=3)
    test = make("omniglot", tmp_path, "test", num_tasks=2)
    assert train.task_names == ["Alpha/character01", "Alpha/character02", "Beta/character01"]
    assert len(train) == 3 * 15 and train.images.shape[1:] == (1, 28, 28)
    assert train.labels.sum(dim=0).tolist() == [15, 15, 15]
    assert len(test) == 2 * 5  # only the selected characters' drawings (drawers 16-20)
    with pytest.raises(MtlbenchError, match="offers 1 to 3 tasks"):
        make("omniglot", tmp_path, "train", num_tasks=4)


def test_omniglot_missing_and_corrupt(tmp_path):
    with pytest.raises(MtlbenchError, match="missing images_background"):
        make("omniglot", tmp_path, "train", num_tasks=1)
    folder = fakedata.write_omniglot(tmp_path, {"Alpha": ["character01"]}, drawers=16)
    (folder / "Alpha" / "character01" / "0000_03.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(MtlbenchError, match="0000_03.png' is corrupt"):
        make("omniglot", tmp_path, "train", num_tasks=1)


def test_omniglot_empty_tree_and_stray_file(tmp_path):
    (tmp_path / "omniglot-py" / "images_background").mkdir(parents=True)
    with pytest.raises(MtlbenchError, match="no character images under"):
        make("omniglot", tmp_path, "train", num_tasks=1)
    folder = fakedata.write_omniglot(tmp_path, {"Alpha": ["character01"]}, drawers=3)
    (folder / "Alpha" / "character01" / "0000_01 copy.png").write_bytes(
        (folder / "Alpha" / "character01" / "0000_01.png").read_bytes())
    with pytest.raises(MtlbenchError, match="unexpected file .*0000_01 copy.png"):
        make("omniglot", tmp_path, "train", num_tasks=1)


def test_failed_download_says_so(tmp_path, monkeypatch):
    """No network: the error says the download failed, not that a file is corrupt."""
    import urllib.error
    import torchvision

    def offline(self):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    with pytest.raises(MtlbenchError, match="the download failed .*URLError.*network") as err:
        make("mnist", tmp_path, "test", download=True)
    assert "corrupt" not in str(err.value)


# ---------------------------------------------------------------- through the CLI
def test_cli_missing_files_is_one_line(tmp_path, capsys):
    from mtlbench.cli import main
    assert main(["run", "--dataset", "cifar10", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing" in err and "--download" in err


# ---------------------------------------------------------------- real MNIST (shared data)
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.skipif(not (SHARED / "mnist" / "raw" / "t10k-images-idx3-ubyte.gz").exists(),
                    reason="the shared real MNIST test split is not present")
@pytest.mark.slow
@pytest.mark.parametrize("method", ["hard", "tr"])
def test_real_mnist_at_the_default_budget(method):
    """hard and tr (sigma 0.5) at mnist's default budget and protocol; a small CNN tells one digit
    from the rest at 97% or better (the README has the measured figures)."""
    from mtlbench.engine import resolve_budget
    from mtlbench.registry import DATASETS
    from helpers import with_method
    mnist = DATASETS.get("mnist")
    cfg = resolve_budget(with_method(RunConfig(dataset="mnist", tasks=10, holdout=0.3, holdout_split="test",
                                               pos_weight=mnist.default_pos_weight,
                                               dataset_options={"image_size": 0, "channels": 0,
                                                                "only_task_classes": False, "verify": True}), method))
    assert cfg.epochs == mnist.default_budget["epochs"]
    data = load_data(cfg, str(SHARED))
    assert len(data.train) + len(data.val) == 7000 and len(data.test) == 3000
    metrics = execute(cfg, data)["metrics"]
    assert metrics["mean_balanced_accuracy"] > 0.95, metrics  # chance is 0.5
