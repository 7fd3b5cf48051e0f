"""``cifar10``: CIFAR-10 as 10 one-vs-rest tasks.

Source: torchvision's ``CIFAR10`` (Krizhevsky, "Learning Multiple Layers of Features from
Tiny Images", 2009). Licence: no explicit licence; distributed for research by its authors.
50,000 training and 10,000 test images, 32x32 RGB.

Expected layout under the data root (torchvision's)::

    cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch, batches.meta

Only the split being read (and ``batches.meta``) must be present. With ``verify`` (the
default) each file is checked against torchvision's published MD5; a truncated or altered
file is an error naming it. The files are Python pickles, which can run code when loaded, so
``verify=false`` is refused unless ``--trust-data`` is given too. Tasks, in order: torchvision's class order (airplane,
automobile, bird, cat, deer, dog, frog, horse, ship, truck), about 10% positives each.
"""
from __future__ import annotations

import os

import torch
import torchvision
from torchvision.datasets.utils import check_integrity

from mtlbench.errors import MtlbenchError
from mtlbench.registry import register_dataset
from mtlbench.vision import VisionTaskDataset, missing, one_vs_rest, reading


def one_split_reader(base: type) -> type:
    class OneSplit(base):
        meta = dict(base.meta, md5=None)  # checksums are checked (or not) by the plugin first

        def _check_integrity(self) -> bool:  # torchvision wants every batch; one split will do
            return all(os.path.isfile(os.path.join(self.root, self.base_folder, f)) for f, _ in split_files(self))

    return OneSplit


def split_files(data) -> list[tuple[str, str]]:
    return (data.train_list if data.train else data.test_list) + [(data.meta["filename"], data.meta["md5"])]


class CifarTasks(VisionTaskDataset):
    torchvision_class: type = torchvision.datasets.CIFAR10
    max_tasks = 10
    default_size = 32
    # Not measured here (no files on the development machine): natural images need more
    # passes than digits for a small CNN; 10 epochs is about 7,000 batches per task.
    default_budget = {"epochs": 10}
    default_pos_weight = "auto"  # one-vs-rest
    pickled = True
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

    def load(self):
        cls, train = self.torchvision_class, self.split == "train"
        folder = self.root / cls.base_folder
        files = (cls.train_list if train else cls.test_list) + [(cls.meta["filename"], cls.meta["md5"])]
        absent = [f for f, _ in files if not (folder / f).is_file()]
        if absent and not self.download:
            raise missing(self.name, folder, absent, "rerun with --download, or extract the official "
                          f"python-version archive ({cls.filename}) into the data root")
        if self.config.verify and not absent:
            for f, md5 in files:
                if not check_integrity(str(folder / f), md5):
                    raise MtlbenchError(f"{self.name}: {str(folder / f)!r} fails its MD5 check (corrupt, "
                                        "truncated or altered); delete it and download it again. It is a Python "
                                        "pickle, so it is not loaded unverified: a planted one would run code")
        with reading(folder / files[0][0], self.name):
            data = one_split_reader(cls)(str(self.root), train=train, download=self.download)
            images = torch.from_numpy(data.data).permute(0, 3, 1, 2)
            targets = torch.as_tensor(data.targets)
        if len(images) != len(targets):
            raise MtlbenchError(f"{self.name}: images and labels in {str(folder)!r} do not match")
        names = [c.replace(" ", "_") for c in data.classes]
        return self.finish(images), one_vs_rest(targets, len(names)), names


@register_dataset("cifar10", "CIFAR-10: 10 one-vs-rest tasks (torchvision CIFAR10).")
class CIFAR10(CifarTasks):
    name = "cifar10"
