"""``celeba``: CelebA's 40 binary face attributes as 40 tasks.

Source: torchvision's ``CelebA`` with ``target_type="attr"`` (Liu, Luo, Wang, Tang, "Deep
Learning Face Attributes in the Wild", ICCV 2015). Licence: non-commercial research use only
(see the CelebA agreement). 202,599 aligned face images (162,770 train, 19,867 valid,
19,962 test), resized here to 64x64 by default (``-o dataset.image_size=N``).

Expected layout under the data root (torchvision's)::

    celeba/img_align_celeba/000001.jpg ...
    celeba/list_attr_celeba.txt  list_eval_partition.txt  identity_CelebA.txt
    celeba/list_bbox_celeba.txt  list_landmarks_align_celeba.txt

Official splits: ``train``, ``valid``, ``test`` (``list_eval_partition.txt``). Tasks, in
order: the 40 attributes in the file's column order (5_o_Clock_Shadow, Arched_Eyebrows,
...). Positive rates range from about 2% to 80%. torchvision's automatic download often
hits Google Drive's quota; the files can be fetched by hand from the CelebA site.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torchvision.datasets.utils import check_integrity

from mtlbench.errors import MtlbenchError
from mtlbench.registry import register_dataset
from mtlbench.vision import VisionTaskDataset, decode_image, missing, reading

TEXT_FILES = ["list_attr_celeba.txt", "list_eval_partition.txt", "identity_CelebA.txt",
              "list_bbox_celeba.txt", "list_landmarks_align_celeba.txt"]


class _CelebA(torchvision.datasets.CelebA):
    def _check_integrity(self) -> bool:  # checksums are checked (or not) by the plugin
        folder = Path(self.root) / self.base_folder
        return all((folder / f).is_file() for f in TEXT_FILES) and (folder / "img_align_celeba").is_dir()


@register_dataset("celeba", "CelebA faces: 40 binary attribute tasks (torchvision CelebA, target_type='attr').")
class CelebA(VisionTaskDataset):
    name = "celeba"
    splits = ("train", "valid", "test")
    max_tasks = 40
    default_size = 64
    default_budget = {"epochs": 3}  # not measured here (no files); about 7,600 batches per task
    default_pos_weight = "auto"  # attributes range from 2% to 80% positives
    mean, std = (0.5063, 0.4258, 0.3832), (0.3106, 0.2904, 0.2896)

    def load(self):
        folder = self.root / "celeba"
        absent = [f for f in TEXT_FILES + ["img_align_celeba/"] if not (folder / f).exists()]
        if absent and not self.download:
            raise missing(self.name, folder, absent, "rerun with --download, or fetch img_align_celeba.zip "
                          "and the annotation files from the CelebA site and unpack them there")
        if self.config.verify and not absent:
            md5 = {f: m for _, m, f in torchvision.datasets.CelebA.file_list}
            for f in TEXT_FILES:
                if not check_integrity(str(folder / f), md5[f]):
                    raise MtlbenchError(f"celeba: {str(folder / f)!r} fails its MD5 check (corrupt or truncated); "
                                        "fetch it again, or pass -o dataset.verify=false")
        with reading(folder / "list_attr_celeba.txt", self.name):
            data = _CelebA(str(self.root), split=self.split, target_type="attr", download=self.download)
        size = self.config.image_size or self.default_size
        images = torch.empty(len(data.filename), 3, size, size, dtype=torch.uint8)
        for i, name in enumerate(data.filename):
            path = folder / "img_align_celeba" / name
            images[i] = decode_image(path, size, "RGB", self.name)
        return self.finish(images), data.attr.to(torch.uint8), [n for n in data.attr_names if n]
