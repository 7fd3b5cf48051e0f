"""``mnist``: handwritten digits as 10 one-vs-rest tasks ("is it a 0", ..., "is it a 9").

Source: torchvision's ``MNIST`` (LeCun, Cortes, Burges). Licence: CC BY-SA 3.0 (Yann LeCun
and Corinna Cortes). 60,000 training and 10,000 test images, 28x28 grayscale.

Expected layout under the data root (torchvision's, or the same in lowercase)::

    MNIST/raw/train-images-idx3-ubyte[.gz]   train-labels-idx1-ubyte[.gz]
    MNIST/raw/t10k-images-idx3-ubyte[.gz]    t10k-labels-idx1-ubyte[.gz]

Only the files of the split being read must be present (torchvision's class insists on
both splits; we ask it to check only the one it reads), so the two test files alone are
enough with ``--holdout``. ``.gz`` files are extracted with torchvision's
``extract_archive`` into ``$MTLBENCH_CACHE`` (default ``~/.cache/mtlbench/extracted``), never
into the data folder itself.

Tasks, in order: ``digit_0`` ... ``digit_9``. Each has about 10% positives, so balanced
accuracy is the headline metric.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torchvision
from torchvision.datasets.utils import extract_archive

from mtlbench.errors import MtlbenchError
from mtlbench.registry import register_dataset
from mtlbench.vision import VisionTaskDataset, cache_dir, missing, one_vs_rest, reading


def split_files(train: bool) -> list[str]:
    prefix = "train" if train else "t10k"
    return [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]


def one_split_reader(base: type) -> type:
    """torchvision's ``base`` (MNIST or FashionMNIST) reading one split from ``raw_folder``."""

    class OneSplit(base):
        def __init__(self, raw: Path, train: bool, download: bool) -> None:
            self._raw = raw
            super().__init__(str(raw.parent.parent), train=train, download=download)

        @property
        def raw_folder(self) -> str:
            return str(self._raw)

        def _check_exists(self) -> bool:
            return all((self._raw / f).is_file() for f in split_files(self.train))

    return OneSplit


class IdxDigits(VisionTaskDataset):
    """Shared by ``mnist`` and ``fashion-mnist``: IDX files read by torchvision's class."""

    torchvision_class: type = torchvision.datasets.MNIST
    folder = "MNIST"
    classes: list[str] = []
    max_tasks = 10
    default_size = 28
    mean, std = (0.1307,), (0.3081,)
    # One-vs-rest: 1 positive in 10. The README has the measurements behind both defaults.
    default_budget = {"epochs": 3}
    default_pos_weight = "auto"

    def raw_dir(self) -> Path:
        files = split_files(self.split == "train")
        for folder in (self.folder, self.folder.lower()):
            raw = self.root / folder / "raw"
            if any((raw / f).exists() or (raw / f"{f}.gz").exists() for f in files):
                return raw
        return self.root / self.folder / "raw"

    def prepared(self) -> Path:
        """A folder holding the split's extracted files (extracting ``.gz`` if needed)."""
        raw, files = self.raw_dir(), split_files(self.split == "train")
        absent = [f for f in files if not (raw / f).is_file() and not (raw / f"{f}.gz").is_file()]
        if absent and not self.download:
            raise missing(self.name, raw, [f"{f}[.gz]" for f in absent],
                          "rerun with --download, or place the official files there")
        if absent or all((raw / f).is_file() for f in files):
            return raw  # torchvision downloads, or everything is already extracted
        # Never write into the data folder (it may be shared or read-only, and root ignores
        # permission bits): extract into the cache instead.
        target = cache_dir() / self.name / hashlib.sha1(str(raw.resolve()).encode()).hexdigest()[:12] / "raw"
        target.mkdir(parents=True, exist_ok=True)
        for f in files:
            source = raw / f if (raw / f).is_file() else raw / f"{f}.gz"
            if (target / f).is_file() and (target / f).stat().st_mtime >= source.stat().st_mtime:
                continue  # extracted before, and the source has not changed since
            if source.suffix != ".gz":
                shutil.copyfile(source, target / f)
            else:
                with reading(raw / f"{f}.gz", self.name):
                    extract_archive(str(raw / f"{f}.gz"), str(target))
        return target

    def load(self):
        raw = self.prepared()
        reader = one_split_reader(self.torchvision_class)
        with reading(raw / split_files(self.split == "train")[0], self.name):
            data = reader(raw, train=self.split == "train", download=self.download)
        if len(data.data) != len(data.targets) or int(data.targets.max()) >= len(self.classes):
            raise MtlbenchError(f"{self.name}: images and labels in {str(raw)!r} do not match; "
                                "the files are corrupt or from different splits")
        return self.finish(data.data), one_vs_rest(data.targets, len(self.classes)), list(self.classes)


@register_dataset("mnist", "MNIST digits: 10 one-vs-rest tasks (torchvision MNIST, IDX files).")
class MNIST(IdxDigits):
    name = "mnist"
    classes = [f"digit_{d}" for d in range(10)]
