"""``cub200``: CUB-200-2011's 312 binary bird attributes as 312 tasks.

Source: Caltech-UCSD Birds-200-2011 (Wah, Branson, Welinder, Perona, Belongie, Caltech
technical report CNS-TR-2011-001). Licence: research use; images are from Flickr under
their owners' terms. 11,788 images of 200 species, resized here to 64x64 by default. The
Task Routing paper's 312-task benchmark. torchvision has no class for it and it has no
automatic download: fetch ``CUB_200_2011.tgz`` from the Caltech Vision Lab and unpack it.

Expected layout under the data root (the official archive's)::

    CUB_200_2011/images.txt                       "<image_id> <relative path>"
    CUB_200_2011/train_test_split.txt             "<image_id> <1 = train, 0 = test>"
    CUB_200_2011/attributes/image_attribute_labels.txt
                                                  "<image_id> <attribute_id> <is_present> ..."
    CUB_200_2011/images/<class folder>/<file>.jpg
    attributes.txt  (or CUB_200_2011/attributes/attributes.txt): "<attribute_id> <name>", optional

Official train/test split from ``train_test_split.txt``. Tasks, in order: attribute ids
1..312 (names like ``has_bill_shape::curved_(up_or_down)`` when ``attributes.txt`` is present,
``attr_001``... otherwise); task t is "attribute t is present".
"""
from __future__ import annotations

from pathlib import Path

import torch

from mtlbench.errors import MtlbenchError
from mtlbench.registry import register_dataset
from mtlbench.vision import VisionTaskDataset, decode_image, missing, reading

NUM_ATTRIBUTES = 312
REQUIRED = ["images.txt", "train_test_split.txt", "attributes/image_attribute_labels.txt", "images/"]


def read_pairs(path: Path, dataset: str) -> list[list[str]]:
    with reading(path, dataset):
        rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
        if any(len(r) < 2 for r in rows):
            raise ValueError("a line has fewer than two fields")
    return rows


@register_dataset("cub200", "CUB-200-2011 birds: 312 binary attribute tasks (the Task Routing paper's benchmark).")
class CUB200(VisionTaskDataset):
    name = "cub200"
    max_tasks = NUM_ATTRIBUTES
    default_size = 64
    default_budget = {"epochs": 20}  # not measured here (no files); about 1,900 batches per task
    default_pos_weight = "auto"  # most attributes are rare
    mean, std = (0.4856, 0.4994, 0.4324), (0.2264, 0.2218, 0.2606)

    def load(self):
        folder = self.root / "CUB_200_2011"
        absent = [f for f in REQUIRED if not (folder / f).exists()]
        if absent:
            raise missing(self.name, folder, absent, "CUB-200-2011 has no automatic download: fetch "
                          "CUB_200_2011.tgz from the Caltech Vision Lab site and unpack it into the data root")
        paths = {int(i): p for i, p in read_pairs(folder / "images.txt", self.name)}
        is_train = {int(i): s == "1" for i, s in read_pairs(folder / "train_test_split.txt", self.name)}
        ids = sorted(i for i in paths if is_train.get(i) == (self.split == "train"))
        labels = self.attribute_labels(folder / "attributes" / "image_attribute_labels.txt", ids)
        size = self.config.image_size or self.default_size
        images = torch.empty(len(ids), 3, size, size, dtype=torch.uint8)
        for row, i in enumerate(ids):
            path = folder / "images" / paths[i]
            images[row] = decode_image(path, size, "RGB", self.name)
        return self.finish(images), labels, self.attribute_names()

    def attribute_labels(self, path: Path, ids: list[int]) -> torch.Tensor:
        row_of = {i: r for r, i in enumerate(ids)}
        labels = torch.zeros(len(ids), NUM_ATTRIBUTES, dtype=torch.uint8)
        seen = torch.zeros(len(ids), dtype=torch.long)
        with reading(path, self.name):
            for line in path.read_text().splitlines():
                fields = line.split()
                if not fields:
                    continue
                image, attr, present = int(fields[0]), int(fields[1]), int(fields[2])
                if image in row_of:
                    labels[row_of[image], attr - 1] = present
                    seen[row_of[image]] += 1
        if len(ids) and int(seen.min()) < NUM_ATTRIBUTES:
            raise MtlbenchError(f"cub200: {str(path)!r} lacks attribute labels for some images (truncated?); "
                                "unpack the official archive again")
        return labels

    def attribute_names(self) -> list[str]:
        for path in (self.root / "attributes.txt", self.root / "CUB_200_2011" / "attributes" / "attributes.txt"):
            if path.is_file():
                names = [name for _, name in read_pairs(path, self.name)]
                if len(names) == NUM_ATTRIBUTES:
                    return names
        return [f"attr_{i:03d}" for i in range(1, NUM_ATTRIBUTES + 1)]
